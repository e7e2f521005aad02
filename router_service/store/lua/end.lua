-- End a reservation: settle it with the true usage, or release it (nothing consumed), or charge
-- usage that had no reservation. Idempotent: an id that ended already changes nothing.
-- KEYS[1] budget  KEYS[2] holds  KEYS[3] deadline  KEYS[4] ended (see the prelude)
-- ARGV[1] reservation id  ARGV[2] tokens consumed ('' = release)  ARGV[3] keys expire at
-- Returns {applied 1|0, used, seq}.
if redis.call('SISMEMBER', KEYS[4], ARGV[1]) == 1 then
  local u = usage(KEYS[1])
  return {0, u[1], u[2]}
end
local delta = 0
local held = redis.call('HGET', KEYS[2], ARGV[1])
if held then
  -- Otherwise the hold was reclaimed (it outlived its deadline) or never reached Redis: the
  -- consumed tokens are charged all the same.
  delta = -tonumber(held)
  redis.call('HDEL', KEYS[2], ARGV[1])
  redis.call('ZREM', KEYS[3], ARGV[1])
end
if ARGV[2] ~= '' then
  delta = delta + tonumber(ARGV[2])
  redis.call('HINCRBYFLOAT', KEYS[1], 'settled', ARGV[2])
end
if delta ~= 0 then
  redis.call('HINCRBYFLOAT', KEYS[1], 'used', delta)
end
redis.call('HINCRBY', KEYS[1], 'seq', 1)
redis.call('SADD', KEYS[4], ARGV[1])
expire_at(KEYS, 1, 4, ARGV[3])
local u = usage(KEYS[1])
return {1, u[1], u[2]}
