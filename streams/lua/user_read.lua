-- One user's read, shared by read.lua (a whole batch on one Redis) and read_user.lua (one
-- user per call on Redis Cluster): prepended to them, it defines read_user().
-- held: the offsets JSON the worker holds the user with ("" if none). Returns false where the
-- stored offsets are those (the worker's copy is current: every write changes them), else
-- {offsets, vector, memory, model_version, recs, window, forget}.
local function read_user(hash, list, held)
  local offsets = redis.call('HGET', hash, 'offsets')
  if offsets and offsets == held then return false end
  local row = redis.call('HMGET', hash, 'vector', 'memory', 'model_version', 'recs', 'forget')
  return {offsets or false, row[1], row[2], row[3], row[4], redis.call('LRANGE', list, 0, -1),
          row[5]}
end
