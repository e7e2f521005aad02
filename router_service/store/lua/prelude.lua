-- Shared by every tollway script (prepended when the script is loaded).
--
-- A model's budget in one window is three keys:
--   budget   hash  used (tokens settled plus held), settled (tokens settled), seq (bumped on every
--                  change, so a replica keeps the newest of the values it reads), restored
--   holds    hash  reservation id -> tokens held for a request in flight
--   deadline zset  reservation id -> unix time after which any replica may reclaim the hold (its
--                  replica died holding it)
-- plus one set per window of reservation ids that ended (settled, released or charged), which
-- makes every write idempotent: a replica may resend an operation whose answer it never got.
-- Floats go back to the client as strings (Lua numbers would be truncated to integers).

local function now_seconds()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end

local function usage(budget)
  local v = redis.call('HMGET', budget, 'used', 'seq')
  return {v[1] or '0', v[2] or '0'}
end

-- What a model still owes from the window before (its `prev_budget` hash): the tokens settled there
-- beyond `budget` (a backend used more than the worst case held for it), repaid as spent budget of
-- this window. Settlements of that window arriving late raise it; a window that passed idle (its
-- keys expired) owes nothing.
local function debt(prev_budget, budget)
  local settled = tonumber(redis.call('HGET', prev_budget, 'settled') or '0')
  return math.max(0, settled - budget)
end

local function reclaim_expired(budget, holds, deadline, now)
  local expired = redis.call('ZRANGEBYSCORE', deadline, '-inf', now, 'LIMIT', 0, 100)
  for _, id in ipairs(expired) do
    local held = redis.call('HGET', holds, id)
    if held then
      redis.call('HINCRBYFLOAT', budget, 'used', -tonumber(held))
      redis.call('HINCRBY', budget, 'seq', 1)
      redis.call('HDEL', holds, id)
    end
    redis.call('ZREM', deadline, id)
  end
end

local function expire_at(keys, first, last, at)
  for i = first, last do
    redis.call('EXPIREAT', keys[i], at)
  end
end
