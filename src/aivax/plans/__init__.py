"""Plans: limits as data, seeded by a migration and edited by the operator."""
