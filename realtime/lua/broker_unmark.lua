local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not score then return 0 end
local m = redis.call('HMGET', KEYS[2], 'o', 's')
if m[1] and m[1] ~= (m[2] or m[1]) then return 0 end
if tonumber(score) > tonumber(redis.call('TIME')[1]) - tonumber(ARGV[2]) then return 0 end
redis.call('ZREM', KEYS[1], ARGV[1])
return 1
