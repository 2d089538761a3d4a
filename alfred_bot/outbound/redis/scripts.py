"""The Lua scripts of shared pacing: each runs atomically inside Redis, so no two nodes can book
the same slot, see a half-written state or lose an update.

Time: every script takes `now` as its first ARGV. Empty (production) means Redis `TIME`: every
node then reads ONE clock, the Redis server's, so a node whose clock is 50 ms off (NTP, a paused
VM) cannot book starts that look spaced on its own clock but bunch up on the others'. Tests pass
a fake time instead and step it by hand. A clock that steps back is clamped to the latest `now`
seen (field `last`), so a booked start never moves earlier.

Numbers: seconds as Lua doubles (microsecond resolution at today's epoch; 2^53 µs is 285 years);
replies carry them as strings because Redis truncates Lua numbers to integers.
"""

from __future__ import annotations

#: Helpers shared by the pacing scripts (prepended to each).
_COMMON = """
local MAX_LAG = 5.0
local MIN_FACTOR = 0.1
-- How long an idle number's state outlives its last use (the AIMD state survives short idles).
local KEEP = 3600

local function clock(state, arg)
  local now
  if arg ~= '' then
    now = tonumber(arg)
  else
    local t = redis.call('TIME')
    now = tonumber(t[1]) + tonumber(t[2]) / 1e6
  end
  local last = tonumber(redis.call('HGET', state, 'last') or '0')
  if now < last then now = last end
  redis.call('HSET', state, 'last', string.format('%.6f', now))
  return now
end

local function factor(state, now)
  local f = redis.call('HMGET', state, 'base', 'cut_at', 'slope')
  if not f[1] then return 1.0, 0.0 end
  local slope = tonumber(f[3])
  return math.min(1.0, tonumber(f[1]) + slope * (now - tonumber(f[2]))), slope
end

local function expire(keys, seconds)
  for _, key in ipairs(keys) do redis.call('PEXPIRE', key, math.ceil(seconds * 1000)) end
end
"""

#: Book starts in the number's log exactly as `SlidingWindowLimiter.reserve` does in one process:
#: at most `capacity` starts in any window of `1 s + margin + the largest recent lag`, spaced
#: `window / capacity` apart with a burst of 5 %, capacity = floor(rate x AIMD factor x `part`),
#: `part` being the share of the live nodes that book here (the others pace alone on theirs).
#: One call books a whole batch (one member id each), in order, until a slot would be more than
#: `ahead` out ('wait') or not free now ('free').
#:
#: KEYS: log (zset: member -> start time), state (hash).
#: ARGV: now, mode, rate, base_window, lag (this node's recent largest lag), ahead, part,
#:       then one member id per start wanted.
#: Reply: {factor, slope, now, wait of the first start not booked (-1: all booked), waits...}:
#: `now` lets the caller place each start on its own clock (`ClockOffset`).
PACE = (
    _COMMON
    + """
local function window_of(state, now, base_window, lag)
  local l = redis.call('HMGET', state, 'lag', 'lag_at')
  local shared = 0.0
  if l[1] and now - tonumber(l[2]) <= base_window then shared = tonumber(l[1]) end
  if lag >= shared then
    redis.call('HSET', state, 'lag', string.format('%.6f', lag), 'lag_at', string.format('%.6f', now))
    shared = lag
  end
  return base_window + math.min(shared, MAX_LAG)
end

-- The wait for a start, and whether room in the window (not the spacing) set it.
local function delay(log, tat, burst, cap, window, interval, now)
  local wait = math.max(0.0, tat - (burst - 1) * interval - now)
  local first = redis.call('ZCOUNT', log, '-inf', now - window)
  local excess = redis.call('ZCARD', log) - first - cap
  if excess >= 0 then
    local at = redis.call('ZRANGE', log, first + excess, first + excess, 'WITHSCORES')
    local full = tonumber(at[2]) + window - now
    if full > wait then return full, true end
  end
  return wait, false
end

local log, state = KEYS[1], KEYS[2]
local now = clock(state, ARGV[1])
local mode, rate, base_window = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local window = window_of(state, now, base_window, tonumber(ARGV[5]))
local ahead, part = tonumber(ARGV[6]), tonumber(ARGV[7])
local f, slope = factor(state, now)
local cap = math.max(1, math.floor(rate * f * part))
local interval = base_window / cap
local burst = math.max(1, math.floor(cap / 20))
local tat = tonumber(redis.call('HGET', state, 'tat') or '0')
redis.call('ZREMRANGEBYSCORE', log, '-inf', now - base_window - MAX_LAG)
local reply = {string.format('%.6f', f), string.format('%.9f', slope), string.format('%.6f', now), '-1'}
for i = 8, #ARGV do
  local wait, held = delay(log, tat, burst, cap, window, interval, now)
  if (mode == 'free' and wait > 0) or wait > ahead then
    reply[4] = string.format('%.6f', wait)
    break
  end
  redis.call('ZADD', log, now + wait, ARGV[i])
  tat = math.max(tat, now + wait) + interval
  -- A start the window held back was not idle time: it earns no burst (see ratelimit.py).
  if held then tat = math.max(tat, now + wait + burst * interval) end
  table.insert(reply, string.format('%.6f', wait))
end
redis.call('HSET', state, 'tat', string.format('%.6f', tat))
expire({log, state}, KEEP)
return reply
"""
)

#: A node back from an outage puts its recent starts (made alone, or booked here before a Redis
#: restart that may have lost them) into the log, so the limit counts them. Idempotent: the
#: member ids are the ones the node booked with. KEYS: log, state.
#: ARGV: now (for the clamp), then pairs of member id and start time (Redis clock).
REPLAY = (
    _COMMON
    + """
clock(KEYS[2], ARGV[1])
for i = 2, #ARGV - 1, 2 do redis.call('ZADD', KEYS[1], tonumber(ARGV[i + 1]), ARGV[i]) end
expire(KEYS, KEEP)
return (#ARGV - 1) / 2
"""
)

#: A node says it books here (every `beat` s) and learns how many do: nodes seen in the last `ttl`
#: seconds. KEYS: the node registry (zset: node -> last beat). ARGV: now, node, ttl.
HEARTBEAT = """
local now = tonumber(ARGV[1])
if ARGV[1] == '' then
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1e6
end
redis.call('ZADD', KEYS[1], now, ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[3]))
redis.call('PEXPIRE', KEYS[1], math.ceil(tonumber(ARGV[3]) * 1000) + 60000)
return redis.call('ZCARD', KEYS[1])
"""

#: A throughput error (130429 / 4 / 80007): AIMD decrease of the number's shared factor, as
#: `ratelimit.Aimd.decrease`; every node's next booking uses it. KEYS: shared state.
#: ARGV: now, factor, duration, hold. Reply: {cut 0/1, factor}.
CUT = (
    _COMMON
    + """
local state = KEYS[1]
local now = clock(state, ARGV[1])
local by, duration, hold = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local current = factor(state, now)
local cut_at = tonumber(redis.call('HGET', state, 'cut_at') or '-1e18')
if now - cut_at < hold then return {0, string.format('%.6f', current)} end
by = math.min(math.max(by, 0.0), 1.0)
local base = math.max(MIN_FACTOR, current * by)
local slope = (1.0 - by) / math.max(duration, 1e-9)
redis.call('HSET', state, 'base', string.format('%.6f', base), 'cut_at', string.format('%.6f', now),
  'slope', string.format('%.9f', slope))
expire({state}, math.max(KEEP, duration + 60))
return {1, string.format('%.6f', base)}
"""
)

#: One recipient's pair budget (as `PairLimiter`): a bucket of `burst` tokens refilled one per
#: `interval`, and a block after 131056 with its strike count. KEYS: the recipient's hash.
#: ARGV: now, burst, interval, max_backoff. Reply: {wait seconds (0: one token spent), strikes}.
PAIR_TAKE = """
local key = KEYS[1]
local now, burst, interval = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
if ARGV[1] == '' then
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1e6
end
local h = redis.call('HMGET', key, 'tokens', 'at', 'until', 'strikes')
local tokens = burst
if h[1] then tokens = math.min(burst, tonumber(h[1]) + (now - tonumber(h[2])) / interval) end
local wait = 0.0
if h[3] then wait = math.max(0.0, tonumber(h[3]) - now) end
if tokens < 1.0 then wait = math.max(wait, (1.0 - tokens) * interval) end
local strikes = tonumber(h[4] or '0')
if wait <= 0 then
  tokens = tokens - 1.0
  redis.call('HSET', key, 'tokens', string.format('%.6f', tokens), 'at', string.format('%.6f', now))
  local ttl = (burst - tokens) * interval
  if h[3] then ttl = math.max(ttl, tonumber(h[3]) + tonumber(ARGV[4]) - now) end
  redis.call('PEXPIRE', key, math.ceil(ttl * 1000) + 1000)
end
return {string.format('%.6f', wait), strikes}
"""

#: Meta said 131056: hold the recipient `seconds` and count a strike; strikes outlive the block by
#: `max_backoff` (so repeated 131056s keep escalating). KEYS: the recipient's hash.
#: ARGV: now, seconds, max_backoff, burst, interval. Reply: strikes.
PAIR_BLOCK = """
local key = KEYS[1]
local now = tonumber(ARGV[1])
if ARGV[1] == '' then
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1e6
end
local strikes = redis.call('HINCRBY', key, 'strikes', 1)
local until_ = now + tonumber(ARGV[2])
redis.call('HSET', key, 'until', string.format('%.6f', until_))
local ttl = math.max(until_ + tonumber(ARGV[3]) - now, tonumber(ARGV[4]) * tonumber(ARGV[5]))
redis.call('PEXPIRE', key, math.ceil(ttl * 1000) + 1000)
return strikes
"""

#: Hold a tenant unless it is already held (the first reason is kept), then tell every node.
#: KEYS: the pauses hash. ARGV: channel, tenant, pause JSON. Reply: 1 if it was not held.
PAUSE_HOLD = """
local added = redis.call('HSETNX', KEYS[1], ARGV[2], ARGV[3])
redis.call('PUBLISH', ARGV[1], ARGV[2])
return added
"""

#: Lift a tenant's pause and tell every node. KEYS: the pauses hash. ARGV: channel, tenant.
PAUSE_LIFT = """
local removed = redis.call('HDEL', KEYS[1], ARGV[2])
redis.call('PUBLISH', ARGV[1], ARGV[2])
return removed
"""
