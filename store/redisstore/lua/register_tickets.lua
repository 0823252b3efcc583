-- RegisterTickets: ARGV node, epoch of its registration, on the last
-- chunk how many of the store's tickets are not named yet ('' on the
-- others), then triples (ticket id, priority, key value), oldest first:
-- one more chunk of the tickets a registration names, so that no call
-- keeps Redis busy long.
-- Reply: how many of them the store had. An error if another
-- registration or a reap came in between.
local node = ARGV[1]
if redis.call('HGET', K_EPOCHS, node) ~= ARGV[2] then
	fail('registration ' .. ARGV[2] .. ' of node ' .. quote(node) .. ' was superseded')
end
local c = cfg()
local touched = {}
local rs = k_reg(node)
local named, found = name_tickets(node, ARGV, 4, touched)
if ARGV[3] ~= '' and tonumber(ARGV[3]) - found <= 0 then
	redis.call('UNLINK', rs) -- all named: no sweep follows
else
	add_named(rs, named)
end
for key in pairs(touched) do grant(key, c) end
return found
