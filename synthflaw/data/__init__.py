"""Stage 01's data: the generated world, its phrasebook and constraints, the embedded and real-corpus data sets,
and how they are stored."""
