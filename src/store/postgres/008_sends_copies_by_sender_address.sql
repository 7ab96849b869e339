-- The copies one sender's mail caused are counted along sends_address,
-- from a row of their own under the sender's address (automatic = 2),
-- rather than along an index by sender (SQLite: the same migration).
INSERT INTO sends (address, ticket_id, automatic, at)
    SELECT sender, ticket_id, 2, at FROM sends WHERE sender IS NOT NULL;
DROP INDEX sends_sender;
