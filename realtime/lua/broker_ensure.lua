local m = redis.call('HMGET', KEYS[1], 'e', 'o')
if m[1] then return m end
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[1], 'e', ARGV[1], 'o', ARGV[2], 's', ARGV[2])
return {ARGV[1], ARGV[2]}
