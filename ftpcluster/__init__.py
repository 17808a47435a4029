"""ftpcluster: a clustered FTP/FTPS server."""
__version__ = "0.1.0"
