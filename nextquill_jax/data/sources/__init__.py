"""One reader per data format (amazon2023, dpl, lamp, generic, synthetic); each yields validated `Record`s."""
