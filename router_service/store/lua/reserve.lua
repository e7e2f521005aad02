-- Hold tokens of one model's budget for one reservation, if the budget can pay them.
-- KEYS[1] budget  KEYS[2] holds  KEYS[3] deadline  KEYS[4] ended (see the prelude)
-- KEYS[5] the previous window's budget (its overdraw is spent budget of this one)
-- ARGV[1] reservation id  ARGV[2] tokens  ARGV[3] budget ('' = admitted already, during an
-- outage: hold without checking)  ARGV[4] hold seconds  ARGV[5] keys expire at (unix seconds)
-- ARGV[6] the change this replica's own operations not yet written will make (counted in the check)
-- Returns {granted 1|0, used, seq, debt} (debt: owed from the previous window, not in used).
local now = now_seconds()
reclaim_expired(KEYS[1], KEYS[2], KEYS[3], now)
local owed = 0
if ARGV[3] ~= '' then
  owed = debt(KEYS[5], tonumber(ARGV[3]))
end
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 1 or redis.call('SISMEMBER', KEYS[4], ARGV[1]) == 1 then
  local u = usage(KEYS[1])
  return {1, u[1], u[2], tostring(owed)}  -- sent twice: held (or ended) already
end
local used = tonumber(redis.call('HGET', KEYS[1], 'used') or '0')
local tokens = tonumber(ARGV[2])
if ARGV[3] ~= '' and used + owed + tonumber(ARGV[6] or '0') + tokens > tonumber(ARGV[3]) then
  local u = usage(KEYS[1])
  return {0, u[1], u[2], tostring(owed)}
end
local new_used = redis.call('HINCRBYFLOAT', KEYS[1], 'used', tokens)
local seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[3], now + tonumber(ARGV[4]), ARGV[1])
expire_at(KEYS, 1, 4, ARGV[5])
return {1, new_used, tostring(seq), tostring(owed)}
