#!lua name=embed_worker_v5
-- embed-worker's document writes: newest version wins, checked and applied atomically on the
-- server, so no read-then-write race between workers remains, and no reader ever sees the
-- chunks of two versions of one document mixed. Loaded once (FUNCTION LOAD) and called by name
-- (FCALL). Every key a function touches is declared in KEYS:
--   KEYS[1] the document key (e.g. doc:42), KEYS[2] its tombstone (e.g. embed:tomb:{doc:42}),
--   KEYS[3] the index's model record (e.g. embed:index:{vector_idx}), or on a Redis Cluster
--   KEYS[1] again (see record_in_reach),
--   KEYS[4], KEYS[5], ... the keys of its chunks doc:42#0, doc:42#1, ... (at least #0; on a
--   cluster doc:{doc:42}#0, ..., so that they share the document's slot).
-- The model record says which model's vectors the index holds: only a writer whose model
-- fingerprint is among its `writers` may change a document (a worker on another model is
-- refused with "model <the index's fingerprint>"), so vector spaces never mix.
-- A document that fits one chunk is one hash at KEYS[1]; a longer one is the hashes of its
-- chunks, each holding __ew_chunks (their count), and nothing at KEYS[1]. When the stored
-- document has more chunks than the caller declared, a function changes nothing and answers
-- "keys <count>": the caller calls again declaring that many.
-- A version is ordered by (producer version, stream entry ID): ARGV[1] is the producer version
-- (a decimal integer, "0" when the entry had none), ARGV[2] the entry ID ("ms-seq").
-- Every hash keeps both in __ew_version and __ew_entry; a tombstone is the string
-- "<version> <entry ID>" with a TTL. Every hash also keeps __ew_model, the fingerprints of the
-- models whose vectors it holds (one, or two while `reindex` adds the next model's), and
-- __ew_digest, the digest of its document's text and chunking rule, which lets an unchanged
-- re-feed skip the model (ew_touch).

local LIBRARY_VERSION = '5'

-- Where the chunk keys start in KEYS.
local CHUNK0 = 4

local function has_word(list, word)
  if not list then return false end
  for w in string.gmatch(list, '%S+') do
    if w == word then return true end
  end
  return false
end

-- nil when a writer of model `fingerprint` may write, else the refusal ("model <the index's
-- fingerprint>", or "model none" when the record is missing).
-- On a Redis Cluster the model record lives in another slot than the document, out of a
-- function's reach (every key must be in one slot): the caller passes the document key in its
-- place. The worker then vouches for its model itself: it checked the record at start-up, and
-- `reindex`, the only writer of `writers`, refuses to run on a cluster.
local function record_in_reach(keys)
  return keys[3] ~= keys[1]
end

local function refused_model(record, fingerprint)
  local r = redis.call('HMGET', record, 'writers', 'fingerprint')
  if has_word(r[1], fingerprint) then return nil end
  return 'model ' .. (r[2] or 'none')
end

local function pad(digits)
  return string.rep('0', 20 - #digits) .. digits
end

-- A fixed-width key whose string order is the version order; nil when it cannot be read
-- (a hash written by something else), which every real version then beats.
local function order_key(version, entry)
  if not version or not entry then return nil end
  local ms, seq = string.match(entry, '^(%d+)-(%d+)$')
  if not ms or not string.match(version, '^%d+$') or #version > 20 or #ms > 20 or #seq > 20 then
    return nil
  end
  return pad(version) .. ':' .. pad(ms) .. '-' .. pad(seq)
end

-- The stored version's order key (nil if none) and its chunk count (0 for a one-chunk
-- document or none).
local function stored(S, keys)
  local whole = S.get(keys[1], { '__ew_version', '__ew_entry' })
  local first = S.get(keys[CHUNK0], { '__ew_version', '__ew_entry', '__ew_chunks' })
  local have = order_key(whole[1], whole[2])
  local chunked = order_key(first[1], first[2])
  if chunked and (not have or chunked > have) then have = chunked end
  return have, tonumber(first[3]) or 0
end

-- 'current' if this very version is already applied, 'superseded' if the document or its
-- tombstone holds a newer one, nil if the caller's version is the newest.
local function stale(keys, have, new)
  if have then
    if have == new then return 'current' end
    if have > new then return 'superseded' end
  end
  local tomb = redis.call('GET', keys[2])
  if tomb then
    local t = order_key(string.match(tomb, '^(%d+) (%S+)$'))
    if t then
      if t == new then return 'current' end
      if t > new then return 'superseded' end
    end
  end
  return nil
end

local function checked_order(args)
  local new = order_key(args[1], args[2])
  if not new then
    return nil, redis.error_reply('ERR embed_worker: bad version ' .. tostring(args[1]) .. ' / ' .. tostring(args[2]))
  end
  return new
end

-- The verdict before any write: nil to go on, else the reply (current, superseded, or the
-- chunk keys the caller must declare). Also the stored chunk count.
local function before_write(S, keys, new)
  local have, chunks = stored(S, keys)
  local why = stale(keys, have, new)
  if why then return why, chunks end
  if chunks > #keys - (CHUNK0 - 1) then return 'keys ' .. chunks, chunks end
  return nil, chunks
end

-- Every document function's checks, in order: a readable version (ARGV[1], ARGV[2]), a writer
-- of the index's model (`fingerprint`), and the newest version. Answers what to reply instead of
-- writing (nil: go on), and the stored chunk count.
local function admitted(S, keys, args, fingerprint)
  local new, err = checked_order(args)
  if not new then return err, 0 end
  if record_in_reach(keys) then
    local no = refused_model(keys[3], fingerprint)
    if no then return no, 0 end
  end
  return before_write(S, keys, new)
end

-- Values one HSET may take: unpack() is bounded by Lua's C stack (8000 in Redis's Lua).
local MAX_HSET_ARGS = 7000

-- Replaces the hash at `key` with exactly `fields` (a flat name, value list). The index
-- re-embeds a document on every write command that touches it (an HNSW delete and insert), so
-- this writes with one HSET, and DELs first only when the stored hash has a field `fields` lacks.
local function replace(key, fields)
  local keep = {}
  for i = 1, #fields, 2 do keep[fields[i]] = true end
  for _, name in ipairs(redis.call('HKEYS', key)) do
    if not keep[name] then
      redis.call('DEL', key)
      break
    end
  end
  if #fields <= MAX_HSET_ARGS then
    redis.call('HSET', key, unpack(fields))
  else
    -- Thousands of fields: in slices (the index then sees one change per slice).
    local i = 1
    while i <= #fields do
      local j = math.min(i + MAX_HSET_ARGS - 1, #fields)
      redis.call('HSET', key, unpack(fields, i, j))
      i = j + 1
    end
  end
end

-- Reads `count` field, value pairs from args at `at`, appending them to `into`; returns the
-- next position.
local function pairs_from(args, at, count, into)
  for _ = 1, count do
    into[#into + 1] = args[at]
    into[#into + 1] = args[at + 1]
    at = at + 2
  end
  return at
end

-- ARGV: version, entry ID, the writer's model fingerprint, the text's digest, the chunk count
-- n, the count c of shared field pairs, those c pairs (the entry's fields every chunk holds),
-- then for each chunk: its pair count and its pairs (the vector among them). Replaces the whole
-- document: a field the new version dropped is gone, and so is every chunk past the new count.
local function upsert(S, keys, args)
  local why, old = admitted(S, keys, args, args[3])
  if why then return why end
  local n = tonumber(args[5])
  local declared = #keys - (CHUNK0 - 1)
  if not n or n < 1 or (n > 1 and n > declared) then
    return redis.error_reply('ERR embed_worker: ' .. tostring(args[5]) .. ' chunks with ' .. declared .. ' chunk keys')
  end
  local book = { '__ew_version', S.str(args[1]), '__ew_entry', S.str(args[2]), '__ew_model', S.str(args[3]),
    '__ew_digest', S.str(args[4]) }
  if n > 1 then
    book[#book + 1] = '__ew_chunks'
    book[#book + 1] = S.str(tostring(n))
  end
  local shared = {}
  local at = pairs_from(args, 7, tonumber(args[6]), shared)
  for c = 1, n do
    local fields = {}
    for i = 1, #book do fields[i] = book[i] end
    for i = 1, #shared do fields[#fields + 1] = shared[i] end
    local count = tonumber(args[at])
    at = pairs_from(args, at + 1, count, fields)
    if n == 1 then
      S.replace(keys[1], fields)
    else
      S.replace(keys[CHUNK0 - 1 + c], fields)
    end
  end
  if n > 1 then
    redis.call('DEL', keys[1])
  end
  for c = (n > 1 and n or 0) + 1, old do
    redis.call('DEL', keys[CHUNK0 - 1 + c])
  end
  redis.call('DEL', keys[2])
  return 'written'
end

-- The vector fields the model record names (the index's, the next model's during a reindex,
-- the previous model's until it is retired): a touch keeps them all.
local function vector_fields(record)
  local f = redis.call('HMGET', record, 'vector_field', 'next_vector_field', 'old_vector_field')
  local out = {}
  for i = 1, 3 do
    if f[i] then out[#out + 1] = f[i] end
  end
  return out
end

-- Whether the hash at `key` holds exactly `fields` (a flat name, value list) besides its
-- version bookkeeping.
local function same_fields(key, fields)
  local stored = redis.call('HGETALL', key)
  local have = {}
  local n = 0
  for i = 1, #stored, 2 do
    local name = stored[i]
    if name ~= '__ew_version' and name ~= '__ew_entry' then
      have[name] = stored[i + 1]
      n = n + 1
    end
  end
  if n * 2 ~= #fields then return false end
  for i = 1, #fields, 2 do
    if have[fields[i]] ~= fields[i + 1] then return false end
  end
  return true
end

-- Storage: how a function reads and writes one stored document (a hash, or a RedisJSON
-- document). Field values a function writes are "raw", as stored: the bytes in a hash, JSON text
-- in a JSON document (the caller encodes the entry's fields and vectors so; `str` encodes the
-- function's own strings). `get` answers decoded strings (nil where absent), `raw` the stored
-- form to write back unchanged.
local HASH = {
  get = function(key, names) return redis.call('HMGET', key, unpack(names)) end,
  raw = function(key, names) return redis.call('HMGET', key, unpack(names)) end,
  str = function(v) return v end,
  replace = function(key, fields) replace(key, fields) end,
  set = function(key, fields) redis.call('HSET', key, unpack(fields)) end,
  del = function(key, name) return redis.call('HDEL', key, name) end,
  same = same_fields,
}

-- A top-level member's JSONPath: $["name"].
local function path(name)
  return '$[' .. cjson.encode(name) .. ']'
end

-- A JSON object's text from a flat name, raw value list.
local function object(fields)
  local members = {}
  for i = 1, #fields, 2 do
    members[#members + 1] = cjson.encode(fields[i]) .. ':' .. fields[i + 1]
  end
  return '{' .. table.concat(members, ',') .. '}'
end

local JSON = {
  get = function(key, names)
    local paths = {}
    for i, name in ipairs(names) do paths[i] = path(name) end
    local reply = redis.call('JSON.GET', key, unpack(paths))
    local out = {}
    if not reply then return out end
    local found = cjson.decode(reply)
    for i, p in ipairs(paths) do
      local matches
      if #paths == 1 then matches = found else matches = found[p] end
      local v = matches and matches[1]
      if v == nil or v == cjson.null then
        out[i] = nil
      elseif type(v) == 'string' then
        out[i] = v
      else
        out[i] = cjson.encode(v)
      end
    end
    return out
  end,
  raw = function(key, names)
    local out = {}
    for i, name in ipairs(names) do
      local reply = redis.call('JSON.GET', key, path(name))
      -- One JSONPath answers a JSON array of its matches: "[<value>]", or "[]".
      if reply and #reply > 2 then out[i] = string.sub(reply, 2, -2) end
    end
    return out
  end,
  str = function(v) return cjson.encode(v) end,
  replace = function(key, fields)
    redis.call('JSON.SET', key, '$', object(fields))
  end,
  -- One JSON.MERGE: the Query Engine re-indexes a JSON document on every write command, so
  -- several members go in one (never null: a null member would be deleted).
  set = function(key, fields)
    redis.call('JSON.MERGE', key, '$', object(fields))
  end,
  del = function(key, name) return redis.call('JSON.DEL', key, path(name)) end,
  -- Always rewritten: the Query Engine re-indexes a JSON document on any write anyway.
  same = function() return false end,
}

-- The fields of one chunk of a multi-chunk document that a touch keeps as they are.
local CHUNK_OWN = { 'chunk', 'chunk_start', 'chunk_end' }

-- ARGV: version, entry ID, the writer's model fingerprint, the text's digest, the text field's
-- name, the parent field's name and value (the document id), the count c of field pairs and
-- those pairs: every field the entry stores, text included, then the writer's vector field
-- (what to keep when the record is out of reach). When the stored document has this
-- digest and holds vectors of this model, its fields are replaced and its version advanced with
-- no model run: "unchanged". A one-chunk document takes the pairs as they are; each chunk of a
-- multi-chunk one takes them less the text, plus the parent, and keeps its own text, number and
-- span. Vectors and the chunk count are kept. Otherwise nothing changes: "changed" (embed it,
-- then ew_upsert).
local function touch(S, keys, args)
  local why, old = admitted(S, keys, args, args[3])
  if why then return why end
  local targets = {}
  if old > 0 then
    for c = 1, old do targets[c] = keys[CHUNK0 - 1 + c] end
  elseif redis.call('EXISTS', keys[1]) == 1 then
    targets[1] = keys[1]
  else
    return 'changed'
  end
  local first = S.get(targets[1], { '__ew_digest', '__ew_model' })
  if first[1] ~= args[4] or not has_word(first[2], args[3]) then return 'changed' end
  local text_field = args[5]
  local given = {}
  pairs_from(args, 9, tonumber(args[8]), given)
  local kept
  if record_in_reach(keys) then
    kept = vector_fields(keys[3])
  else
    kept = { args[9 + 2 * tonumber(args[8])] }
  end
  kept[#kept + 1] = '__ew_chunks'
  if old > 0 then
    local without_text = {}
    for i = 1, #given, 2 do
      if given[i] ~= text_field then
        without_text[#without_text + 1] = given[i]
        without_text[#without_text + 1] = given[i + 1]
      end
    end
    without_text[#without_text + 1] = args[6]
    without_text[#without_text + 1] = S.str(args[7])
    given = without_text
    kept[#kept + 1] = text_field
    for _, name in ipairs(CHUNK_OWN) do kept[#kept + 1] = name end
  end
  for _, key in ipairs(targets) do
    local values = S.raw(key, kept)
    local fields = { '__ew_model', S.str(first[2]), '__ew_digest', S.str(args[4]) }
    for i = 1, #given do fields[#fields + 1] = given[i] end
    for i, name in ipairs(kept) do
      if values[i] then
        fields[#fields + 1] = name
        fields[#fields + 1] = values[i]
      end
    end
    if S.same(key, fields) then
      -- A replay: only the version moves. Outside the schema, so with the Query Engine's
      -- PARTIAL_INDEXED_DOCS the index is not touched at all.
      S.set(key, { '__ew_version', S.str(args[1]), '__ew_entry', S.str(args[2]) })
    else
      fields[#fields + 1] = '__ew_version'
      fields[#fields + 1] = S.str(args[1])
      fields[#fields + 1] = '__ew_entry'
      fields[#fields + 1] = S.str(args[2])
      S.replace(key, fields)
    end
  end
  redis.call('DEL', keys[2])
  return 'unchanged'
end

-- ARGV: version, entry ID, tombstone TTL in milliseconds, the writer's model fingerprint.
-- Removes the document (every chunk) and leaves a tombstone that stops older upserts arriving late.
local function delete(S, keys, args)
  local why, old = admitted(S, keys, args, args[4])
  if why then return why end
  local removed = redis.call('DEL', keys[1])
  for c = 1, old do
    removed = removed + redis.call('DEL', keys[CHUNK0 - 1 + c])
  end
  redis.call('SET', keys[2], args[1] .. ' ' .. args[2], 'PX', args[3])
  if removed > 0 then return 'deleted' end
  return 'absent'
end

-- The model record: KEYS[1] the record. ARGV: fingerprint, model name, index name, vector
-- field. Creates it when missing (the first worker of an index); answers the record as a flat
-- field, value list either way, so every worker compares its model with the same one.
local function adopt(keys, args)
  if redis.call('EXISTS', keys[1]) == 0 then
    redis.call('HSET', keys[1], 'fingerprint', args[1], 'model', args[2], 'index', args[3],
      'vector_field', args[4], 'writers', args[1])
  end
  return redis.call('HGETALL', keys[1])
end

-- `reindex`: adds the next model's vector to one stored hash (a document or one chunk), unless
-- it was rewritten since it was read. KEYS[1] the hash, KEYS[2] the model record. ARGV: the
-- version and entry ID read with its text, the next model's fingerprint, the vector bytes.
-- Answers "written", "changed" (a newer version was written since: its writer's version will
-- be embedded again), or "not migrating" (the record names no such next model).
local function reembed(S, keys, args)
  local r = redis.call('HMGET', keys[2], 'next_fingerprint', 'next_vector_field')
  if r[1] ~= args[3] or not r[2] then return 'not migrating' end
  local have = S.get(keys[1], { '__ew_version', '__ew_entry', '__ew_model' })
  if have[1] ~= args[1] or have[2] ~= args[2] then return 'changed' end
  local models = have[3] or ''
  if not has_word(models, args[3]) then models = models .. ' ' .. args[3] end
  S.set(keys[1], { r[2], args[4], '__ew_model', S.str(models) })
  return 'written'
end

-- `reindex --drop-old`: removes the previous model's vector from one stored hash once the index
-- has moved on. KEYS[1] the hash, KEYS[2] the model record. ARGV: that vector field and model
-- fingerprint. Answers "retired", "none" (nothing of it there), or "current" (refused: that
-- model is still the index's).
local function retire(S, keys, args)
  local current = redis.call('HGET', keys[2], 'fingerprint')
  if not current or current == args[2] then return 'current' end
  local models = S.get(keys[1], { '__ew_model' })[1]
  local removed = S.del(keys[1], args[1])
  if has_word(models, args[2]) then
    local kept = {}
    for w in string.gmatch(models, '%S+') do
      if w ~= args[2] then kept[#kept + 1] = w end
    end
    S.set(keys[1], { '__ew_model', S.str(table.concat(kept, ' ')) })
    removed = removed + 1
  end
  if removed > 0 then return 'retired' end
  return 'none'
end

-- Each document function twice: ew_<name>_v5 on hashes, ew_json_<name>_v5 on JSON documents.
-- (Spelled out: the library's load-time environment has no pairs/ipairs.)
local function both(name, f)
  redis.register_function('ew_' .. name .. '_v5', function(keys, args) return f(HASH, keys, args) end)
  redis.register_function('ew_json_' .. name .. '_v5', function(keys, args) return f(JSON, keys, args) end)
end
both('upsert', upsert)
both('touch', touch)
both('delete', delete)
both('reembed', reembed)
both('retire', retire)
redis.register_function('ew_adopt_v5', adopt)
redis.register_function{
  function_name = 'ew_library_version_v5',
  callback = function() return LIBRARY_VERSION end,
  flags = { 'no-writes' },
}
