"""The spool directory: layout, atomic writes, intake, claims, control markers, recovery, retention."""
