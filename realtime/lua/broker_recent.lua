local m = redis.call('HMGET', KEYS[1], 'e', 'o')
if not m[1] then return {} end
local top, since = tonumber(m[2]), tonumber(ARGV[2])
if m[1] ~= ARGV[1] or since > top or top - since > tonumber(ARGV[3]) then
  return {m[1], m[2]}
end
if since == top then return {m[1], m[2], {}} end
local first = string.format('%d', since + 1) .. '-0'
return {m[1], m[2], redis.call('XRANGE', KEYS[2], first, '+')}
