-- Redis came back without the window's data (restarted without persistence): add back the usage
-- this replica last saw (the first replica to reach Redis again does it). Idempotent: the restored
-- amount is remembered, a second report only adds what exceeds it; operations written after the
-- loss stay on top.
-- KEYS[1] budget  ARGV[1] usage this replica last saw  ARGV[2] key expires at
-- Returns {used, seq}.
local restored = tonumber(redis.call('HGET', KEYS[1], 'restored') or '0')
local seen = tonumber(ARGV[1])
if seen > restored then
  redis.call('HINCRBYFLOAT', KEYS[1], 'used', seen - restored)
  redis.call('HSET', KEYS[1], 'restored', ARGV[1])
  redis.call('HINCRBY', KEYS[1], 'seq', 1)
end
redis.call('EXPIREAT', KEYS[1], ARGV[2])
return usage(KEYS[1])
