local meta, stream, idem = KEYS[1], KEYS[2], KEYS[3]
if idem then
  local first = redis.call('GET', idem)
  if first then
    local epoch, offset = string.match(first, '^(%S+) (%d+) ')
    local frame = false
    if redis.call('HGET', meta, 'e') == epoch then
      local entry = redis.call('XRANGE', stream, offset .. '-0', offset .. '-0')
      if #entry == 1 then frame = entry[1][2][2] end
    end
    return {1, first, frame}
  end
end
local m = redis.call('HMGET', meta, 'e', 'o', 's', 'n')
local epoch, last, stored = m[1], m[2], m[3]
-- On a Redis Cluster the meta names the master that wrote it. Another master's meta means a
-- failover (replication is asynchronous: this promoted replica may lack the last writes it
-- acknowledged) or a slot moved: offsets from here could repeat acknowledged ones, so the
-- channel starts a new epoch instead (clients recover with `recovered: false`).
local me = false
if ARGV[13] == '1' then me = redis.call('CLUSTER', 'MYID') end
if epoch and me and m[4] and m[4] ~= me then epoch = false end
if not epoch then
  if ARGV[7] == '' then return {2} end
  epoch, last, stored = ARGV[7], ARGV[8], ARGV[8]
  redis.call('DEL', stream)
  redis.call('HSET', meta, 'e', epoch, 'o', last, 's', last)
end
if me then redis.call('HSET', meta, 'n', me) end
local offset = string.format('%d', tonumber(last) + 1)
local rest = string.sub(ARGV[2], 2)
local frame
if string.find(rest, '^%s*}%s*$') then
  frame = ARGV[1] .. ',"epoch":"' .. epoch .. '","offset":' .. offset .. '}'
else
  frame = ARGV[1] .. ',"epoch":"' .. epoch .. '","offset":' .. offset .. ',' .. rest
end
if ARGV[9] == '1' then
  -- A durable channel's window keeps what is not confirmed stored (up to ARGV[10]).
  if not stored then
    stored = last  -- a channel from before storage marks: what came before counts as stored
    redis.call('HSET', meta, 's', last)
  end
  redis.call('XADD', stream, offset .. '-0', 'f', frame)
  local keep = tonumber(offset) - tonumber(ARGV[4]) + 1
  local above = tonumber(stored) + 1
  if above < keep then
    keep = math.max(above, tonumber(offset) - tonumber(ARGV[10]) + 1)
  end
  if keep > 1 then
    redis.call('XTRIM', stream, 'MINID', string.format('%d', keep) .. '-0')
  end
else
  redis.call('XADD', stream, 'MAXLEN', ARGV[4], offset .. '-0', 'f', frame)
end
redis.call('HSET', meta, 'o', offset)
-- Room state expires after ARGV[11] ms without a publication (0: never), but never while a
-- durable channel holds publications not confirmed stored (the reconciler's only copy):
-- those keys persist until the confirmation that catches up sets the expiry again.
local ttl = tonumber(ARGV[11])
if ttl > 0 then
  if ARGV[9] == '1' then
    redis.call('PERSIST', meta)
    redis.call('PERSIST', stream)
  else
    redis.call('PEXPIRE', meta, ttl)
    redis.call('PEXPIRE', stream, ttl)
  end
end
redis.call(ARGV[12], ARGV[6], 'm' .. epoch .. ' ' .. offset .. '\n' .. frame)
if idem then
  redis.call('SET', idem, epoch .. ' ' .. offset .. ' ' .. ARGV[3], 'PX', ARGV[5])
end
return {0, epoch, offset}
