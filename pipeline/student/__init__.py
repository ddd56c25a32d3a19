"""Phase 2, the student: the RPN (copied middle layers + q/k head) and its masked-BCE training."""
