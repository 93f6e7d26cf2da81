-- Admission: rate limits, then every limited quota, then the reservation, in one step.
-- KEYS: 1 q (the user's month: m t b c used, rt rc reserved), 2 r (this reservation),
--       3 rz (open reservations by deadline), 4 rl (the key's requests-per-minute cell),
--       5 tpm (the user's tokens-per-minute cell)
-- ARGV: 1 mode (gen|upstart|upbytes|billed|other), 2 msg limit, 3 token limit, 4 byte limit,
--       5 cost limit (units; -1: none), 6 hard (1/0), 7 prompt, 8 cap (-1: none), 9 base cost,
--       10 cost per output token, 11 candidates, 12 min output, 13 declared bytes,
--       14 rpm (0: none), 15 tpm (0: none), 16 reservation ttl ms, 17 month ttl s, 18 res id
-- Returns {status, why, cap, m, t, b, c, rt, rc, retry_ms, held_t, held_c}
--   status 1 admitted, 0 refused (why: quota), 2 rate limited (why: rpm|tpm)
local q, r, rz = KEYS[1], KEYS[2], KEYS[3]
-- Whole numbers as Redis takes them (a Lua number would be written as 1.5e+16, and -0 is
-- not an integer to Redis).
local function i(x) if x == 0 then return '0' end return string.format('%.0f', x) end
local function field(name)
  return tonumber(redis.call('HGET', q, name) or 0)
end
local stored = redis.call('HMGET', r, 'cap', 't0', 'c0')
if stored[1] then
  -- A retry of a call whose reply was lost: the same verdict, counted once.
  return {1, '', tonumber(stored[1]), field('m'), field('t'), field('b'), field('c'), field('rt'),
          field('rc'), 0, tonumber(stored[2]), tonumber(stored[3])}
end
local tm = redis.call('TIME')
local now = tonumber(tm[1]) * 1000 + math.floor(tonumber(tm[2]) / 1000)
local mode = ARGV[1]
local lm, lt, lb, lc = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])

-- Reservations past their deadline: their caller is gone (a crashed replica), so what they hold
-- is given back; their records, if any, reach the counters from that replica's log.
local expired = redis.call('ZRANGEBYSCORE', rz, '-inf', now, 'LIMIT', 0, 16)
for _, id in ipairs(expired) do
  local rk = string.sub(r, 1, string.len(r) - string.len(ARGV[18])) .. id
  local h = redis.call('HMGET', rk, 'm', 't', 'c', 's')
  if h[4] == 'h' then
    redis.call('HINCRBY', q, 'm', i(-tonumber(h[1] or 0)))
    redis.call('HINCRBY', q, 'rt', i(-tonumber(h[2] or 0)))
    redis.call('HINCRBY', q, 'rc', i(-tonumber(h[3] or 0)))
  end
  redis.call('DEL', rk)
  redis.call('ZREM', rz, id)
end

local h = redis.call('HMGET', q, 'm', 't', 'b', 'c', 'rt', 'rc')
local m, t, b, c = tonumber(h[1] or 0), tonumber(h[2] or 0), tonumber(h[3] or 0), tonumber(h[4] or 0)
local rt, rc = tonumber(h[5] or 0), tonumber(h[6] or 0)
local function reply(status, why, cap, retry, ht, hc)
  return {status, why, cap, m, t, b, c, rt, rc, retry, ht, hc}
end

-- Rate limits (GCRA on the server's clock: replicas' clocks do not matter).
local rpm = tonumber(ARGV[14])
if rpm > 0 then
  local period = 60000 / rpm
  local tau = period * (rpm - 1)
  local tat = math.max(tonumber(redis.call('GET', KEYS[4]) or now), now)
  if tat - now > tau then
    return reply(2, 'rpm', -1, math.ceil(tat - now - tau), 0, 0)
  end
  redis.call('SET', KEYS[4], i(tat + period), 'PX', i(math.ceil(tat + period - now) + 1000))
end
local tpm = tonumber(ARGV[15])
if mode == 'gen' and tpm > 0 then
  local tat = tonumber(redis.call('GET', KEYS[5]) or now)
  if tat - now >= 60000 then
    return reply(2, 'tpm', -1, math.ceil(tat - now - 60000) + 1, 0, 0)
  end
end

local held_m, held_t, held_c, cap = 0, 0, 0, -1
if mode == 'gen' then
  if lm >= 0 and m >= lm then return reply(0, 'messages', -1, 0, 0, 0) end
  local hard = ARGV[6] == '1'
  local prompt, wcap = tonumber(ARGV[7]), tonumber(ARGV[8])
  local base, per_out = tonumber(ARGV[9]), tonumber(ARGV[10])
  local n, min_out = tonumber(ARGV[11]), tonumber(ARGV[12])
  if hard and prompt >= 0 then
    -- The largest output cap that keeps used + reserved + this call within every limit.
    local inf = -1
    local room = wcap
    local floor = min_out
    if room >= 0 and room < floor then floor = room end
    if lt >= 0 then
      local left = math.max(lt - t - rt, 0) - prompt
      if left < 0 then return reply(0, 'tokens', -1, 0, 0, 0) end
      local cc = math.floor(left / n)
      if cc < floor then return reply(0, 'tokens', -1, 0, 0, 0) end
      if room == inf or cc < room then room = cc end
    end
    if lc >= 0 then
      local left = lc - c - rc - base
      if left < 0 then return reply(0, 'cost', -1, 0, 0, 0) end
      if per_out > 0 then
        local cc = math.floor(left / (per_out * n))
        if cc < floor then return reply(0, 'cost', -1, 0, 0, 0) end
        if room == inf or cc < room then room = cc end
      end
    end
    cap = room
    local out = 0
    if room ~= inf then out = room end
    held_t = prompt + out * n
    held_c = base + per_out * out * n
  elseif hard then
    if lt >= 0 and t + rt >= lt then return reply(0, 'tokens', -1, 0, 0, 0) end
    if lc >= 0 and c + rc >= lc then return reply(0, 'cost', -1, 0, 0, 0) end
  else
    if lt >= 0 and t >= lt then return reply(0, 'tokens', -1, 0, 0, 0) end
    if lc >= 0 and c >= lc then return reply(0, 'cost', -1, 0, 0, 0) end
  end
  held_m = 1
elseif mode == 'upstart' then
  local declared = tonumber(ARGV[13])
  if lb >= 0 and (b >= lb or b + declared > lb) then return reply(0, 'bytes', -1, 0, 0, 0) end
  if lc >= 0 and c >= lc then return reply(0, 'cost', -1, 0, 0, 0) end
  return reply(1, '', -1, 0, 0, 0)
elseif mode == 'upbytes' then
  if lb >= 0 and b >= lb then return reply(0, 'bytes', -1, 0, 0, 0) end
  return reply(1, '', -1, 0, 0, 0)
elseif mode == 'billed' then
  if lc >= 0 and c + rc >= lc then return reply(0, 'cost', -1, 0, 0, 0) end
  return reply(1, '', -1, 0, 0, 0)
else
  return reply(1, '', -1, 0, 0, 0)
end

-- Reserve: the message counts at once; tokens and cost are held apart.
m = m + held_m
rt = rt + held_t
rc = rc + held_c
redis.call('HINCRBY', q, 'm', i(held_m))
if held_t ~= 0 then redis.call('HINCRBY', q, 'rt', i(held_t)) end
if held_c ~= 0 then redis.call('HINCRBY', q, 'rc', i(held_c)) end
redis.call('EXPIRE', q, ARGV[17])
if tpm > 0 and held_t > 0 then
  local tat = math.max(tonumber(redis.call('GET', KEYS[5]) or now), now)
  local next = tat + held_t * 60000 / tpm
  redis.call('SET', KEYS[5], i(next), 'PX', i(math.ceil(next - now) + 1000))
end
local res = reply(1, '', cap, 0, held_t, held_c)
local ttl = tonumber(ARGV[16])
redis.call('HSET', r, 's', 'h', 'm', i(held_m), 't', i(held_t), 'c', i(held_c), 'cap', i(cap),
  't0', i(held_t), 'c0', i(held_c))
redis.call('PEXPIRE', r, i(ttl + 86400000))
redis.call('ZADD', rz, i(now + ttl), ARGV[18])
redis.call('PEXPIRE', rz, i(ttl + 86400000))
return res
