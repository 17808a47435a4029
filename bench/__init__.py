"""`make bench`: ftpcluster measured side by side with pyftpdlib and ProFTPD.

The bench starts every peer itself (loopback, random ports, temp dirs, the same
user, files and certificate), drives them with the same clients (bench.loadgen
for sessions, curl for bulk transfers) and prints ftpcluster's ratio to each
peer next to the project's targets. Ratios, not absolute numbers, are the
point: the machine is shared."""
