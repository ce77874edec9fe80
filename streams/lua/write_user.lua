-- One user's write on Redis Cluster (a script reaches the keys of one slot only), atomic per
-- user. Runs with user_write.lua prepended (write_user).
-- KEYS[1] the user's hash, KEYS[2] its window list.
-- ARGV[1] ttl_ms, ARGV[2] now_ms, ARGV[3] the user's 11 values (write.lua) as MessagePack.
-- Returns 1, or 0 without writing where the stored offsets are not the ones the batch read
-- (another worker wrote the user since: compare-and-set); the caller retries the batch.
local user = cmsgpack.unpack(ARGV[3])
if (redis.call('HGET', KEYS[1], 'offsets') or '') ~= user[1] then return 0 end
write_user(KEYS[1], KEYS[2], user, tonumber(ARGV[1]), ARGV[2])
return 1
