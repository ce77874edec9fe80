-- Rebase popularity: scale every stored score so the weights are relative to a later epoch.
-- KEYS[1] popularity zset, KEYS[2] popularity epoch.
-- ARGV[1] the new epoch (ms), ARGV[2] the half-life (ms).
-- Returns 1. The scale comes from the stored epoch, so two workers rebasing at once cannot
-- scale twice: the second finds the epoch already moved and does nothing.
local current = tonumber(redis.call('GET', KEYS[2]))
local target = tonumber(ARGV[1])
if current and current < target then
  local factor = 2 ^ ((current - target) / tonumber(ARGV[2]))
  redis.call('ZUNIONSTORE', KEYS[1], 1, KEYS[1], 'WEIGHTS', tostring(factor))
  redis.call('SET', KEYS[2], ARGV[1])
end
return 1
