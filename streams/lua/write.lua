-- A batch's write: every user's new state, popularity increments and online counters, atomic.
-- Runs with user_write.lua prepended (write_user).
-- KEYS[1] popularity zset, KEYS[2] popularity epoch, KEYS[3] online counters hash, then per
-- user (hash, window list).
-- ARGV[1] ttl_ms, ARGV[2] now_ms, ARGV[3] the epoch the weights are relative to ("" = none),
-- ARGV[4] n_items, ARGV[5] n_online, then n_items (item, weight) pairs, n_online (counter,
-- increment) pairs, then the users: one MessagePack array with, per user in KEYS order, an
-- array of 11 values: the offsets JSON read before the batch ("" = none), mode ("append" or
-- "replace"), the new window entries (an array of JSON strings), the window length after the
-- batch, offsets, vector ("" = unchanged), memory, model_version, recs ("" = unchanged),
-- wipe ("1": a forget request: delete the stored vector, memory, model_version and recs
-- before writing what came after it), forget mark ("" = unchanged, "-" = delete, else the
-- JSON to store).
-- Why one argument for the users: packing nine arguments per user into the command was a
-- visible share of the worker's GIL time; MessagePack of the same values is one C call, and
-- Lua's cmsgpack unpacks it (it has no bin type: bytes arrive as strings).
-- Returns 1, or 0 without writing anything where the popularity epoch or any user's offsets
-- changed since the read (another worker wrote: compare-and-set); the caller retries the batch.
local ttl, now = tonumber(ARGV[1]), ARGV[2]
local n_items, n_online = tonumber(ARGV[4]), tonumber(ARGV[5])
local users = cmsgpack.unpack(ARGV[6 + 2 * n_items + 2 * n_online])
local epoch = redis.call('GET', KEYS[2])
if n_items > 0 and epoch and epoch ~= ARGV[3] then return 0 end
for u = 1, #users do
  local stored = redis.call('HGET', KEYS[2 * u + 2], 'offsets')
  if (stored or '') ~= users[u][1] then return 0 end
end
local a = 6
if n_items > 0 then
  if not epoch then redis.call('SET', KEYS[2], ARGV[3]) end
  for i = 1, n_items do
    redis.call('ZINCRBY', KEYS[1], ARGV[a + 1], ARGV[a])
    a = a + 2
  end
end
for i = 1, n_online do
  redis.call('HINCRBY', KEYS[3], ARGV[a], ARGV[a + 1])
  a = a + 2
end
for u = 1, #users do
  write_user(KEYS[2 * u + 2], KEYS[2 * u + 3], users[u], ttl, now)
end
return 1
