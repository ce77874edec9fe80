-- A batch's read: the popular items, the popularity epoch and every user's state, one call.
-- Runs with user_read.lua prepended (read_user).
-- KEYS[1] popularity zset, KEYS[2] popularity epoch, then per user (hash, window list).
-- ARGV[1] popular_n, then per user the offsets JSON this worker holds it with ("" if none).
-- Returns {popular (flat item, score), epoch, then per user read_user()'s answer}.
local out = {}
out[1] = redis.call('ZREVRANGE', KEYS[1], 0, tonumber(ARGV[1]) - 1, 'WITHSCORES')
out[2] = redis.call('GET', KEYS[2])
for u = 1, (#KEYS - 2) / 2 do
  out[u + 2] = read_user(KEYS[2 * u + 1], KEYS[2 * u + 2], ARGV[u + 1])
end
return out
