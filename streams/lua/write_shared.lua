-- A batch's shared counters on Redis Cluster, where they live in a slot of their own and are
-- written apart from the users: popularity increments and online hit-rate counters, each
-- counted once per input event however often the batch is replayed.
-- KEYS[1] popularity zset, KEYS[2] popularity epoch, KEYS[3] online counters hash, KEYS[4]
-- counted-offsets hash ("topic/partition" -> highest input offset counted).
-- ARGV[1] the epoch the weights are relative to ("" = none), ARGV[2] MessagePack array of
-- {source, offset, item, weight} per new event (the weight a string: full precision),
-- ARGV[3] MessagePack array of {source, offset, counter, increment} per online count.
-- Why the offsets: the users are written after this script, one call each, so a crash between
-- the two replays events whose counts are already in; an entry at or below its partition's
-- counted offset is one of those and is skipped.
-- Returns 1, or 0 without writing when there are items and the stored epoch is not ARGV[1]
-- (another worker rebased since the read); the caller retries the batch.
local items, online = cmsgpack.unpack(ARGV[2]), cmsgpack.unpack(ARGV[3])
local epoch = redis.call('GET', KEYS[2])
if #items > 0 and epoch and epoch ~= ARGV[1] then return 0 end
if #items > 0 and not epoch then redis.call('SET', KEYS[2], ARGV[1]) end
local counted, newest = {}, {}
local function fresh(source, offset)
  if counted[source] == nil then
    counted[source] = tonumber(redis.call('HGET', KEYS[4], source) or '-1')
  end
  if offset <= counted[source] then return false end
  if (newest[source] or -1) < offset then newest[source] = offset end
  return true
end
for i = 1, #items do
  local e = items[i]
  if fresh(e[1], e[2]) then redis.call('ZINCRBY', KEYS[1], e[4], e[3]) end
end
for i = 1, #online do
  local e = online[i]
  if fresh(e[1], e[2]) then redis.call('HINCRBY', KEYS[3], e[3], e[4]) end
end
for source, offset in pairs(newest) do
  redis.call('HSET', KEYS[4], source, string.format('%d', offset))
end
return 1
