"""Phase 1, the teacher: self-responses (decode), attention capture and dump, sink removal and labels."""
