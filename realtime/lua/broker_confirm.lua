local m = redis.call('HMGET', KEYS[1], 'e', 'o', 's')
if not m[1] then return {} end
local top = tonumber(m[2])
local stored = tonumber(m[3] or m[2])
if m[1] == ARGV[1] then
  local target = math.min(tonumber(ARGV[2]), top)
  if target > stored then
    stored = target
    redis.call('HSET', KEYS[1], 's', string.format('%d', stored))
  end
  local keep = math.min(top - tonumber(ARGV[3]) + 1, stored + 1)
  if keep > 1 then
    redis.call('XTRIM', KEYS[2], 'MINID', string.format('%d', keep) .. '-0')
  end
  -- Everything is stored: the room's state may now expire when idle (ARGV[4] ms, 0: never).
  local ttl = tonumber(ARGV[4])
  if ttl > 0 and stored >= top then
    redis.call('PEXPIRE', KEYS[1], ttl)
    redis.call('PEXPIRE', KEYS[2], ttl)
  end
end
return {m[1], m[2], string.format('%d', stored)}
