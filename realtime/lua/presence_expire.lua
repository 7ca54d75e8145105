local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

local cutoff = string.format('%d', now - tonumber(ARGV[1]))
local stale = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', '(' .. cutoff, 'LIMIT', 0, ARGV[2])
local left = {}
for _, conn in ipairs(stale) do
  redis.call('ZREM', KEYS[2], conn)
  local prev = redis.call('HGET', KEYS[1], conn)
  if prev then
    redis.call('HDEL', KEYS[1], conn)
    local user = cjson.decode(prev)[1]
    if redis.call('HINCRBY', KEYS[3], user, -1) <= 0 then
      redis.call('HDEL', KEYS[3], user)
      redis.call('HDEL', KEYS[4], user)
      table.insert(left, prev)
    end
  end
end
return {#stale, redis.call('HLEN', KEYS[1]), left}
