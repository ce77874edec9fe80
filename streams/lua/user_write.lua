-- One user's write, shared by write.lua (a whole batch on one Redis) and write_user.lua (one
-- user per call on Redis Cluster): prepended to them, it defines write_user().
-- user: the array of 11 values write.lua's header describes. ttl: ms (0 = keep forever).
-- Why one HSET: each redis.call costs the script more than the command itself.
local function write_user(hash, list, user, ttl, now)
  if user[2] == 'replace' then redis.call('DEL', list) end
  local entries = user[3]
  local length = -1  -- unknown
  for i = 1, #entries, 1000 do  -- unpack() fails past ~8000 values
    length = redis.call('RPUSH', list, unpack(entries, i, math.min(i + 999, #entries)))
  end
  local keep = user[4]
  if keep <= 0 then
    redis.call('DEL', list)
  elseif length < 0 or length > keep then
    redis.call('LTRIM', list, -keep, -1)
  end
  if user[10] == '1' then redis.call('HDEL', hash, 'vector', 'memory', 'model_version', 'recs') end
  local fields = {'offsets', user[5], 'updated_ms', now}
  if user[6] ~= '' then
    fields[5], fields[6] = 'vector', user[6]
    fields[7], fields[8] = 'memory', user[7]
    fields[9], fields[10] = 'model_version', user[8]
  end
  if user[9] ~= '' then
    fields[#fields + 1] = 'recs'
    fields[#fields + 1] = user[9]
  end
  if user[11] ~= '' and user[11] ~= '-' then
    fields[#fields + 1] = 'forget'
    fields[#fields + 1] = user[11]
  end
  redis.call('HSET', hash, unpack(fields))
  if user[11] == '-' then redis.call('HDEL', hash, 'forget') end
  if ttl > 0 then
    redis.call('PEXPIRE', hash, ttl)
    if keep > 0 then redis.call('PEXPIRE', list, ttl) end
  end
end
