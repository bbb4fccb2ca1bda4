-- Read a counter together with this server's life, in one call that a cluster
-- routes to the counter's node (INFO on a cluster client would ask every node).
-- KEYS: counter; ARGV: '' for every field, else the reservation field to read
-- Reply: {run id, {field, value, ...}} | {run id, {pos, run, reservation}}
if ARGV[1] == '' then return {current_run(), redis.call('HGETALL', KEYS[1])} end
return {current_run(), redis.call('HMGET', KEYS[1], 'pos', 'run', ARGV[1])}
