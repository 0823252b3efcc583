-- SetLimits: ARGV max, maxw, wait_ms, order. Reply: set_at (ms).
local now = now_ms()
redis.call('HSET', K_CFG, 'max', ARGV[1], 'maxw', ARGV[2], 'wait_ms', ARGV[3],
	'order', ARGV[4], 'set_at', now)
grant_all(cfg())
return now
