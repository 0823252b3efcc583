-- SetPaused: ARGV 0|1. Resuming grants every free slot. Reply: 1.
redis.call('HSET', K_CFG, 'paused', ARGV[1])
if ARGV[1] == '0' then grant_all(cfg()) end
return 1
