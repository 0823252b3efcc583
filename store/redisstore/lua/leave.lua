-- Leave: ARGV node, ticket id, priority, key value, seq seen, lease ms.
-- Reply: 1 if the ticket was in line (and is no more), 0 if not (granted,
-- or unknown), -1 if the store went back in time (register).
local node, id, prio, key = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
if went_back(ARGV[5], ARGV[6], nil) then return -1 end
if not unqueue(node, id, prio, key) then return 0 end
redis.call('HDEL', k_tickets(node), id)
return 1
