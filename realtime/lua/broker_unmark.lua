local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not score then return 0 end
-- The room's offset and mark: read here when the room shares the Redis (KEYS[2]); on a
-- cluster they live in another slot, so the caller read them just before (ARGV[3], ARGV[4]).
local m
if KEYS[2] then
  m = redis.call('HMGET', KEYS[2], 'o', 's')
else
  m = {ARGV[3] ~= '' and ARGV[3] or false, ARGV[4] ~= '' and ARGV[4] or false}
end
if m[1] and m[1] ~= (m[2] or m[1]) then return 0 end
if tonumber(score) > tonumber(redis.call('TIME')[1]) - tonumber(ARGV[2]) then return 0 end
redis.call('ZREM', KEYS[1], ARGV[1])
return 1
