local m = redis.call('HMGET', KEYS[1], 'e', 'o')
if m[1] then return m end
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[1], 'e', ARGV[1], 'o', ARGV[2], 's', ARGV[2])
-- On a Redis Cluster, the master that wrote it (see broker_publish.lua).
if ARGV[4] == '1' then redis.call('HSET', KEYS[1], 'n', redis.call('CLUSTER', 'MYID')) end
-- A channel only read (joined, never published to) expires like an idle one (ARGV[3] ms).
if tonumber(ARGV[3]) > 0 then redis.call('PEXPIRE', KEYS[1], ARGV[3]) end
return {ARGV[1], ARGV[2]}
