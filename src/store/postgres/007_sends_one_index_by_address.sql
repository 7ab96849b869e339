-- One index by address serves the count of an address's automatic
-- messages and that of its re-sends on one ticket (SQLite: the same
-- migration).
DROP INDEX sends_automatic;
DROP INDEX sends_ticket;
CREATE INDEX sends_address ON sends (address, automatic, ticket_id, at);
