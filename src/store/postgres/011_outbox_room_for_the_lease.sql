-- An outbox row is written three times: queued, leased (leased_by,
-- leased_until: no indexed column), marked. Pages left half empty let the
-- lease's version go on the row's own page, a HOT update that touches no
-- index, where a full page made it a new version elsewhere and an entry in
-- each index. The rows of before stay where they are.
ALTER TABLE outbox SET (fillfactor = 50);
