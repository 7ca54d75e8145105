if redis.call('HGET', KEYS[1], 'e') ~= ARGV[1] then return {} end
return redis.call('XRANGE', KEYS[2], ARGV[2] .. '-0', ARGV[3] .. '-0')
