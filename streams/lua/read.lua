-- A batch's read: the popular items, the popularity epoch and every user's state, one call.
-- KEYS[1] popularity zset, KEYS[2] popularity epoch, then per user (hash, window list).
-- ARGV[1] popular_n, then per user the offsets JSON this worker holds it with ("" if none).
-- Returns {popular (flat item, score), epoch, then per user false or {offsets, vector, memory,
-- model_version, recs, window, forget}}: false where the stored offsets are the ones in ARGV (the
-- worker's copy of the user is current: every write changes them), the whole user otherwise.
local out = {}
out[1] = redis.call('ZREVRANGE', KEYS[1], 0, tonumber(ARGV[1]) - 1, 'WITHSCORES')
out[2] = redis.call('GET', KEYS[2])
for u = 1, (#KEYS - 2) / 2 do
  local hash, list = KEYS[2 * u + 1], KEYS[2 * u + 2]
  local offsets = redis.call('HGET', hash, 'offsets')
  if offsets and offsets == ARGV[u + 1] then
    out[u + 2] = false
  else
    local row = redis.call('HMGET', hash, 'vector', 'memory', 'model_version', 'recs', 'forget')
    out[u + 2] = {offsets or false, row[1], row[2], row[3], row[4],
                  redis.call('LRANGE', list, 0, -1), row[5]}
  end
end
return out
