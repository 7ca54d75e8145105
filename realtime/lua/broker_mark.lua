redis.call('ZADD', KEYS[1], redis.call('TIME')[1], ARGV[1])
