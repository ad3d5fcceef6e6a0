#!lua name=embed_worker
-- embed-worker's document writes: newest version wins, checked and applied atomically on the
-- server, so no read-then-write race between workers remains, and no reader ever sees the
-- chunks of two versions of one document mixed. Loaded once (FUNCTION LOAD) and called by name
-- (FCALL). Every key a function touches is declared in KEYS:
--   KEYS[1] the document key (e.g. doc:42), KEYS[2] its tombstone (e.g. embed:tomb:{doc:42}),
--   KEYS[3], KEYS[4], ... the keys of its chunks doc:42#0, doc:42#1, ... (at least #0).
-- A document that fits one chunk is one hash at KEYS[1]; a longer one is the hashes of its
-- chunks, each holding __ew_chunks (their count), and nothing at KEYS[1]. When the stored
-- document has more chunks than the caller declared, a function changes nothing and answers
-- "keys <count>": the caller calls again declaring that many.
-- A version is ordered by (producer version, stream entry ID): ARGV[1] is the producer version
-- (a decimal integer, "0" when the entry had none), ARGV[2] the entry ID ("ms-seq").
-- Every hash keeps both in __ew_version and __ew_entry; a tombstone is the string
-- "<version> <entry ID>" with a TTL.

local LIBRARY_VERSION = '3'

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
local function stored(keys)
  local whole = redis.call('HMGET', keys[1], '__ew_version', '__ew_entry')
  local first = redis.call('HMGET', keys[3], '__ew_version', '__ew_entry', '__ew_chunks')
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
local function before_write(keys, new)
  local have, chunks = stored(keys)
  local why = stale(keys, have, new)
  if why then return why, chunks end
  if chunks > #keys - 2 then return 'keys ' .. chunks, chunks end
  return nil, chunks
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

-- ARGV: version, entry ID, the chunk count n, the count c of shared field pairs, those c pairs
-- (the entry's fields every chunk holds), then for each chunk: its pair count and its pairs
-- (the vector among them). Replaces the whole document: a field the new version dropped is
-- gone, and so is every chunk past the new count.
local function upsert(keys, args)
  local new, err = checked_order(args)
  if not new then return err end
  local why, old = before_write(keys, new)
  if why then return why end
  local n = tonumber(args[3])
  if not n or n < 1 or (n > 1 and n > #keys - 2) then
    return redis.error_reply('ERR embed_worker: ' .. tostring(args[3]) .. ' chunks with ' .. (#keys - 2) .. ' chunk keys')
  end
  local book = { '__ew_version', args[1], '__ew_entry', args[2] }
  if n > 1 then
    book[5] = '__ew_chunks'
    book[6] = tostring(n)
  end
  local shared = {}
  local at = pairs_from(args, 5, tonumber(args[4]), shared)
  for c = 1, n do
    local fields = {}
    for i = 1, #book do fields[i] = book[i] end
    for i = 1, #shared do fields[#fields + 1] = shared[i] end
    local count = tonumber(args[at])
    at = pairs_from(args, at + 1, count, fields)
    if n == 1 then
      replace(keys[1], fields)
    else
      replace(keys[2 + c], fields)
    end
  end
  if n > 1 then
    redis.call('DEL', keys[1])
  end
  for c = (n > 1 and n or 0) + 1, old do
    redis.call('DEL', keys[2 + c])
  end
  redis.call('DEL', keys[2])
  return 'written'
end

-- ARGV: version, entry ID, tombstone TTL in milliseconds.
-- Removes the document (every chunk) and leaves a tombstone that stops older upserts arriving late.
local function delete(keys, args)
  local new, err = checked_order(args)
  if not new then return err end
  local why, old = before_write(keys, new)
  if why then return why end
  local removed = redis.call('DEL', keys[1])
  for c = 1, old do
    removed = removed + redis.call('DEL', keys[2 + c])
  end
  redis.call('SET', keys[2], args[1] .. ' ' .. args[2], 'PX', args[3])
  if removed > 0 then return 'deleted' end
  return 'absent'
end

redis.register_function('ew_upsert', upsert)
redis.register_function('ew_delete', delete)
redis.register_function{
  function_name = 'ew_library_version',
  callback = function() return LIBRARY_VERSION end,
  flags = { 'no-writes' },
}
