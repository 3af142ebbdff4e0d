-- Runs once, when the PostgreSQL container initialises an empty data volume
-- (/docker-entrypoint-initdb.d). `python -m common.migrate` (the compose `migrate` job) also
-- creates any database that is missing and then applies migrations/<database>/*.sql.
CREATE DATABASE users_db;
CREATE DATABASE templates_db;
CREATE DATABASE notifications_db;
