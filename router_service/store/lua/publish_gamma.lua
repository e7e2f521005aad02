-- Publish dual prices; every replica adopts the highest version.
-- KEYS[1] gamma hash  ARGV[1] gamma as JSON  ARGV[2] publishing replica
-- Returns the new version.
local version = redis.call('HINCRBY', KEYS[1], 'version', 1)
redis.call('HSET', KEYS[1], 'gamma', ARGV[1], 'origin', ARGV[2])
return version
