local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

local prev = redis.call('HGET', KEYS[1], ARGV[1])
if prev then
  local prev_user = cjson.decode(prev)[1]
  if prev_user ~= ARGV[3] then
    if redis.call('HINCRBY', KEYS[3], prev_user, -1) <= 0 then
      redis.call('HDEL', KEYS[3], prev_user)
      redis.call('HDEL', KEYS[4], prev_user)
    end
    prev = false
  end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], now, ARGV[1])
redis.call('HSET', KEYS[4], ARGV[3], ARGV[4])
if not prev and redis.call('HINCRBY', KEYS[3], ARGV[3], 1) == 1 then
  return 1
end
return 0
