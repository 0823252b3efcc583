-- Give: ARGV node, key value, "<seq seen> <lease ms>". Reply: 1 if a slot
-- was freed, 0 if the node held none of key (it was reaped, or the store
-- lost its data), -1 if the store went back in time (register).
local node, key = ARGV[1], ARGV[2]
if went_back(ARGV[3], cfg()) then return -1 end
local hh = k_held(node)
local h = int(redis.call('HGET', hh, key), 'held:' .. node)
if h <= 0 then return 0 end
local c = cfg()
local a = int(redis.call('HGET', K_ACTIVE, key), 'active')
if h == 1 then redis.call('HDEL', hh, key) else redis.call('HSET', hh, key, h - 1) end
if a <= 1 then redis.call('HDEL', K_ACTIVE, key) else redis.call('HSET', K_ACTIVE, key, a - 1) end
add(K_TOT, 'a', -1)
grant(key, c)
return 1
