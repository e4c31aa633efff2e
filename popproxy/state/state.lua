-- popproxy's shared state: one script, run with EVALSHA, one round trip per call.
--
-- ARGV[1] is the operation, ARGV[2] the time override: empty in production,
-- so that the time is the Redis server's own (TIME), the one clock every
-- worker and host agrees on; the tests pass explicit times to compare this
-- script with popproxy.state.memory step by step.
--
-- Times are seconds as doubles.  They are stored with %.17g, which reads
-- back to the same double: Lua's tostring keeps only 14 digits, which would
-- lose microseconds at the size of today's Unix time.  Every script result
-- that is not an integer is returned as such a string, because Redis turns
-- a Lua number reply into an integer.
--
-- Needs Redis >= 5 or any Valkey: scripts that call TIME and then write
-- are replicated by their effects there.

local op = ARGV[1]
local now
if ARGV[2] ~= '' then
  now = tonumber(ARGV[2])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
end

local function fmt(x)
  return string.format('%.17g', x)
end

-- Keys outlive what they hold by this much, so that a key never expires
-- between two calls that still depend on it (clock steps, test clocks).
local SLACK_MS = 60000

local function ms(seconds)
  return math.ceil(seconds * 1000) + SLACK_MS
end

-- GCRA over several limits at once.  Per key: interval (seconds per unit),
-- tau (burst * interval) and cost (units; 0 = only ask that the limit is not
-- overdrawn).  The key holds the theoretical arrival time (TAT).  A limit
-- admits when tat' - now <= tau, where tat' = max(tat, now) + min(cost,
-- burst) * interval: the token bucket of popproxy.policy.ratelimit, where a
-- cost above the burst is admitted on a full bucket and overdraws it.
-- All limits are charged only when every one admits, unless ARGV[3] is '1'
-- (monitor mode, and charging octets after a reply), which charges them all.
-- Reply: {charged (0|1), wait_1, ..., wait_n}, waits as strings, '0' = admitted.
if op == 'take' then
  local force = ARGV[3] == '1'
  local tats, waits = {}, {}
  local all = true
  for i = 1, #KEYS do
    local base = 4 + (i - 1) * 3
    local interval = tonumber(ARGV[base])
    local tau = tonumber(ARGV[base + 1])
    local cost = tonumber(ARGV[base + 2])
    local tat = tonumber(redis.call('GET', KEYS[i]) or '0')
    if tat < now then
      tat = now
    end
    tats[i] = tat
    local need = math.min(cost, tau / interval)
    local over = (tat - now) + need * interval - tau
    if over > 1e-9 * interval then
      waits[i] = fmt(over)
      all = false
    else
      waits[i] = '0'
    end
  end
  local charged = 0
  if all or force then
    charged = 1
    for i = 1, #KEYS do
      local base = 4 + (i - 1) * 3
      local cost = tonumber(ARGV[base + 2])
      if cost > 0 then
        local tat = tats[i] + cost * tonumber(ARGV[base])
        redis.call('SET', KEYS[i], fmt(tat), 'PX', ms(tat - now))
      end
    end
  end
  local reply = {charged}
  for i = 1, #KEYS do
    reply[i + 1] = waits[i]
  end
  return reply
end

-- Failed logins: a sorted set per key of failure times (score = time), the
-- newest ARGV[4] kept; those at or before now - window are dropped first.
-- ARGV[3] window, ARGV[4] keep, ARGV[5] a nonce that makes members unique.
-- Reply: the count within the window per key, after adding.
if op == 'fail' then
  local window = tonumber(ARGV[3])
  local keep = tonumber(ARGV[4])
  local counts = {}
  for i = 1, #KEYS do
    redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', fmt(now - window))
    redis.call('ZADD', KEYS[i], fmt(now), fmt(now) .. ':' .. ARGV[5] .. ':' .. i)
    redis.call('ZREMRANGEBYRANK', KEYS[i], 0, -(keep + 1))
    redis.call('PEXPIRE', KEYS[i], ms(window))
    counts[i] = redis.call('ZCARD', KEYS[i])
  end
  return counts
end

-- The failures within the window, per key, without adding one.  ARGV[3] window.
if op == 'failures' then
  local window = tonumber(ARGV[3])
  local counts = {}
  for i = 1, #KEYS do
    counts[i] = redis.call('ZCOUNT', KEYS[i], '(' .. fmt(now - window), '+inf')
  end
  return counts
end

-- Session caps: a sorted set of leases per cap (member = session id, score =
-- expiry).  Expired leases go first, so a killed process's slots come back
-- by themselves.  ARGV[3] session, ARGV[4] limit, ARGV[5] ttl.
-- A session that holds a lease already keeps it (and it is renewed).
-- Reply: 1 acquired, 0 the cap is full.
local function expire_set(key)
  -- The set lives as long as its longest lease.
  local last = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
  if last[2] then
    redis.call('PEXPIRE', key, ms(tonumber(last[2]) - now))
  end
end

if op == 'acquire' then
  local key, session = KEYS[1], ARGV[3]
  local limit, ttl = tonumber(ARGV[4]), tonumber(ARGV[5])
  redis.call('ZREMRANGEBYSCORE', key, '-inf', fmt(now))
  if not redis.call('ZSCORE', key, session) and redis.call('ZCARD', key) >= limit then
    return 0
  end
  redis.call('ZADD', key, fmt(now + ttl), session)
  expire_set(key)
  return 1
end

-- Renew a session's leases: ARGV[3] session, ARGV[4] ttl.  Reply per key:
-- 1 renewed, 0 the lease was gone (expired or never held); a lost lease is
-- not taken again here, since that could go over the cap.
if op == 'renew' then
  local session, ttl = ARGV[3], tonumber(ARGV[4])
  local held = {}
  for i = 1, #KEYS do
    local key = KEYS[i]
    redis.call('ZREMRANGEBYSCORE', key, '-inf', fmt(now))
    if redis.call('ZSCORE', key, session) then
      redis.call('ZADD', key, 'XX', fmt(now + ttl), session)
      expire_set(key)
      held[i] = 1
    else
      held[i] = 0
    end
  end
  return held
end

-- A login: each failure key's count within the window (as 'failures') and,
-- unless a count has reached its limit, a lease of the cap (the last key)
-- for the session (as 'acquire').  ARGV[3] window, ARGV[4] session, ARGV[5]
-- the cap's limit, ARGV[6] ttl, ARGV[7..] the limit of each failure key.
-- Reply: {count_1, ..., count_n, acquired (0|1)}.
if op == 'login' then
  local window = tonumber(ARGV[3])
  local n = #KEYS - 1
  local reply = {}
  local under = true
  for i = 1, n do
    reply[i] = redis.call('ZCOUNT', KEYS[i], '(' .. fmt(now - window), '+inf')
    if reply[i] >= tonumber(ARGV[6 + i]) then
      under = false
    end
  end
  reply[n + 1] = 0
  if under then
    local key, session = KEYS[n + 1], ARGV[4]
    redis.call('ZREMRANGEBYSCORE', key, '-inf', fmt(now))
    if redis.call('ZSCORE', key, session) or redis.call('ZCARD', key) < tonumber(ARGV[5]) then
      redis.call('ZADD', key, fmt(now + tonumber(ARGV[6])), session)
      expire_set(key)
      reply[n + 1] = 1
    end
  end
  return reply
end

-- Release several sessions' leases at once: KEYS the caps, ARGV[2 + i] the
-- session whose lease of KEYS[i] goes.  Reply: how many were held.
if op == 'release_many' then
  local n = 0
  for i = 1, #KEYS do
    n = n + redis.call('ZREM', KEYS[i], ARGV[2 + i])
  end
  return n
end

-- Release a session's leases: ARGV[3] session.  Reply: how many were held.
if op == 'release' then
  local n = 0
  for i = 1, #KEYS do
    n = n + redis.call('ZREM', KEYS[i], ARGV[3])
  end
  return n
end

-- Forget keys (a successful login clears its failures).  Reply: how many existed.
if op == 'clear' then
  return redis.call('DEL', unpack(KEYS))
end

return redis.error_reply('popproxy state script: unknown operation ' .. tostring(op))
