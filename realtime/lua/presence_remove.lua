local prev = redis.call('HGET', KEYS[1], ARGV[1])
if not prev then return false end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
local user = cjson.decode(prev)[1]
if redis.call('HINCRBY', KEYS[3], user, -1) <= 0 then
  redis.call('HDEL', KEYS[3], user)
  redis.call('HDEL', KEYS[4], user)
  return prev
end
return false
