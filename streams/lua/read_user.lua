-- One user's read on Redis Cluster, where a script reaches the keys of one slot only (a
-- user's two keys share one: the hash tag). Runs with user_read.lua prepended (read_user).
-- KEYS[1] the user's hash, KEYS[2] its window list; ARGV[1] the offsets held ("" if none).
-- Returns false where the held copy is current, else the user's stored values (read.lua).
return read_user(KEYS[1], KEYS[2], ARGV[1])
