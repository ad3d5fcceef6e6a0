#!lua name=embed_worker
-- embed-worker's document writes: newest version wins, checked and applied atomically on the
-- server, so no read-then-write race between workers remains. Loaded once (FUNCTION LOAD) and
-- called by name (FCALL). Every key a function touches is declared in KEYS:
--   KEYS[1] the document key (e.g. doc:42), KEYS[2] its tombstone (e.g. embed:tomb:{doc:42}).
-- A version is ordered by (producer version, stream entry ID): ARGV[1] is the producer version
-- (a decimal integer, "0" when the entry had none), ARGV[2] the entry ID ("ms-seq").
-- The document hash keeps both in __ew_version and __ew_entry; a tombstone is the string
-- "<version> <entry ID>" with a TTL.

local LIBRARY_VERSION = '2'

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

-- 'current' if this very version is already applied, 'superseded' if the document or its
-- tombstone holds a newer one, nil if the caller's version is the newest.
local function stale(keys, new)
  local stored = redis.call('HMGET', keys[1], '__ew_version', '__ew_entry')
  local have = order_key(stored[1], stored[2])
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

-- Values one HSET may take: unpack() is bounded by Lua's C stack (8000 in Redis's Lua).
local MAX_HSET_ARGS = 7000

-- ARGV: version, entry ID, then field, value, field, value, ... (the vector among them).
-- Replaces the whole hash: a field the new version dropped is gone. The index re-embeds a
-- document on every write command that touches it (an HNSW delete and insert), so this writes
-- with one HSET, and DELs first only when the stored hash has a field the new version lacks.
local function upsert(keys, args)
  local new, err = checked_order(args)
  if not new then return err end
  local why = stale(keys, new)
  if why then return why end
  local fields = { '__ew_version', args[1], '__ew_entry', args[2] }
  local keep = { __ew_version = true, __ew_entry = true }
  for i = 3, #args, 2 do
    keep[args[i]] = true
    fields[#fields + 1] = args[i]
    fields[#fields + 1] = args[i + 1]
  end
  for _, name in ipairs(redis.call('HKEYS', keys[1])) do
    if not keep[name] then
      redis.call('DEL', keys[1])
      break
    end
  end
  if #fields <= MAX_HSET_ARGS then
    redis.call('HSET', keys[1], unpack(fields))
  else
    -- Thousands of fields: in slices (the index then sees one change per slice).
    local i = 1
    while i <= #fields do
      local j = math.min(i + MAX_HSET_ARGS - 1, #fields)
      redis.call('HSET', keys[1], unpack(fields, i, j))
      i = j + 1
    end
  end
  redis.call('DEL', keys[2])
  return 'written'
end

-- ARGV: version, entry ID, tombstone TTL in milliseconds.
-- Removes the document and leaves a tombstone that stops older upserts arriving late.
local function delete(keys, args)
  local new, err = checked_order(args)
  if not new then return err end
  local why = stale(keys, new)
  if why then return why end
  local removed = redis.call('DEL', keys[1])
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
