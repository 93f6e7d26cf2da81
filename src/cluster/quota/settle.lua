-- Settlement of one record (or the release of a reservation), idempotent.
-- KEYS: 1 q (the record's month), 2 r (the reservation, or any key), 3 rz, 4 w (per-replica
--       watermarks of the user), 5 tpm
-- ARGV: 1 replica, 2 record id (32 hex; '' for a release alone), 3 month ttl s,
--       4 release message (0/1), 5 release tokens, 6 release cost, 7 whole (0/1),
--       8 messages, 9 tokens, 10 bytes, 11 cost, 12 tpm (0: none), 13 tokens-per-minute change,
--       14 reservation id
-- Returns {applied, m, t, b, c, rt, rc}
local q, r, rz, w = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local function i(x) if x == 0 then return '0' end return string.format('%.0f', x) end
local function state(applied)
  local h = redis.call('HMGET', q, 'm', 't', 'b', 'c', 'rt', 'rc')
  return {applied, tonumber(h[1] or 0), tonumber(h[2] or 0), tonumber(h[3] or 0), tonumber(h[4] or 0),
          tonumber(h[5] or 0), tonumber(h[6] or 0)}
end
local id = ARGV[2]
if id ~= '' then
  -- A replica settles its records in log order (ids only grow): one at or below the
  -- watermark was settled already (a retry, or a replay after a crash).
  local last = redis.call('HGET', w, ARGV[1])
  if last and last >= id then return state(0) end
  if redis.call('HSET', w, ARGV[1], id) == 1 then
    redis.call('EXPIRE', w, 3456000)
  end
end
-- What changes in the month's counters, netted per field (a message that replaces the held
-- one changes nothing), so each field is written at most once.
local d = {m = tonumber(ARGV[8]), t = tonumber(ARGV[9]), b = tonumber(ARGV[10]), c = tonumber(ARGV[11]),
           rt = 0, rc = 0}
if ARGV[14] ~= '' then
  local h = redis.call('HMGET', r, 's', 'm', 't', 'c')
  if h[1] == 'h' then
    local hm, ht, hc = tonumber(h[2] or 0), tonumber(h[3] or 0), tonumber(h[4] or 0)
    local gm, gt, gc = hm, ht, hc
    if ARGV[7] ~= '1' then
      gm = math.min(tonumber(ARGV[4]), hm)
      gt = math.min(tonumber(ARGV[5]), ht)
      gc = math.min(tonumber(ARGV[6]), hc)
    end
    d.m = d.m - gm
    d.rt = -gt
    d.rc = -gc
    if ARGV[7] == '1' then
      redis.call('DEL', r)
      redis.call('ZREM', rz, ARGV[14])
    else
      redis.call('HSET', r, 'm', i(hm - gm), 't', i(ht - gt), 'c', i(hc - gc))
    end
  end
end
for f, v in pairs(d) do
  if v ~= 0 then redis.call('HINCRBY', q, f, i(v)) end
end
redis.call('EXPIRE', q, ARGV[3])
local tpm, dt = tonumber(ARGV[12]), tonumber(ARGV[13])
if tpm > 0 and dt ~= 0 then
  local tm = redis.call('TIME')
  local now = tonumber(tm[1]) * 1000 + math.floor(tonumber(tm[2]) / 1000)
  local tat = math.max(tonumber(redis.call('GET', KEYS[5]) or now), now)
  local next = math.max(tat + dt * 60000 / tpm, now)
  if next > now then
    redis.call('SET', KEYS[5], i(next), 'PX', i(math.ceil(next - now) + 1000))
  end
end
return state(1)
