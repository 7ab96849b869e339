-- An attachment's bytes in a column of their own at the end of the row,
-- where SQLite can write a large one in place (SQLite: the same
-- migration). Rows from before keep theirs in data; new ones leave it empty.
ALTER TABLE attachments ADD COLUMN content BYTEA;
