-- One replica's periodic sync: heartbeat, live replicas, fleet query count, gamma version, and
-- every budgeted model's usage in the current window (reclaiming holds past their deadline).
-- KEYS[1] replicas zset (replica id -> last heartbeat)  KEYS[2] query counter of the window
-- KEYS[3] gamma hash  then four keys per model: budget, holds, deadline, the previous window's budget
-- ARGV[1] replica id  ARGV[2] heartbeat counts as alive for this many seconds
-- ARGV[3] queries routed by this replica since its last sync  ARGV[4] window keys expire at
-- Returns {now, live replicas, window queries, gamma version, used_1, seq_1, previous settled_1, ...}.
local now = now_seconds()
local alive = tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - alive)
redis.call('EXPIRE', KEYS[1], math.ceil(alive * 10))
local live = redis.call('ZCARD', KEYS[1])
local queries = redis.call('INCRBY', KEYS[2], ARGV[3])
redis.call('EXPIREAT', KEYS[2], ARGV[4])
local version = redis.call('HGET', KEYS[3], 'version') or '0'
local out = {tostring(now), live, queries, version}
for i = 4, #KEYS, 4 do
  reclaim_expired(KEYS[i], KEYS[i + 1], KEYS[i + 2], now)
  local u = usage(KEYS[i])
  out[#out + 1] = u[1]
  out[#out + 1] = u[2]
  out[#out + 1] = redis.call('HGET', KEYS[i + 3], 'settled') or '0'
end
return out
