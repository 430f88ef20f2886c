"""Training SAEs on a stream of activation batches (`fit`) and the trainer states that make a
killed run resume exactly (`checkpoint`)."""
