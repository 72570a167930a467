-- Kokoa schema v1 exactly as shipped (MIGRATIONS[0]); frozen for the upgrade test.
        CREATE TABLE origins (
            id                 TEXT PRIMARY KEY CHECK (length(id) = 36),
            name               TEXT NOT NULL CHECK (length(name) BETWEEN 1 AND 64),
            name_key           TEXT NOT NULL UNIQUE,
            wg_ip              TEXT NOT NULL UNIQUE,
            wg_public_key      TEXT NOT NULL UNIQUE CHECK (length(wg_public_key) = 44),
            wg_private_key_enc BLOB,
            wg_endpoint        TEXT,
            created_at         TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%SZ','now'))
        );
        CREATE TABLE routes (
            id          TEXT PRIMARY KEY CHECK (length(id) = 36),
            hostname    TEXT NOT NULL UNIQUE CHECK (length(hostname) BETWEEN 1 AND 253),
            origin_id   TEXT NOT NULL REFERENCES origins (id) ON DELETE RESTRICT,
            target_port INTEGER NOT NULL
                        CHECK (typeof(target_port) = 'integer'
                               AND target_port BETWEEN 1 AND 65535),
            created_at  TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%SZ','now'))
        );
CREATE INDEX routes_origin_id ON routes (origin_id);
        CREATE TABLE edge_nodes (
            id             TEXT PRIMARY KEY CHECK (length(id) = 36),
            name           TEXT NOT NULL CHECK (length(name) BETWEEN 1 AND 64),
            name_key       TEXT NOT NULL UNIQUE,
            token_hash     TEXT NOT NULL UNIQUE CHECK (length(token_hash) = 64),
            wg_ip          TEXT UNIQUE,
            wg_public_key  TEXT UNIQUE,
            wg_endpoint    TEXT,
            created_at     TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%SZ','now')),
            last_seen      TEXT,
            applied_hash   TEXT,
            status_ok      INTEGER,
            last_error     TEXT,
            last_status_at TEXT,
            certificates   TEXT NOT NULL DEFAULT '{}'
        );
        CREATE TABLE settings (
            key   TEXT PRIMARY KEY,
            value TEXT NOT NULL
        );
        CREATE TRIGGER origins_wg_ip_unique_insert
        BEFORE INSERT ON origins
        WHEN NEW.wg_ip IS NOT NULL
         AND EXISTS (SELECT 1 FROM edge_nodes WHERE wg_ip = NEW.wg_ip)
        BEGIN
            SELECT RAISE(ABORT, 'UNIQUE constraint failed: origins.wg_ip');
        END;
        CREATE TRIGGER origins_wg_ip_unique_update
        BEFORE UPDATE ON origins
        WHEN NEW.wg_ip IS NOT NULL
         AND EXISTS (SELECT 1 FROM edge_nodes WHERE wg_ip = NEW.wg_ip)
        BEGIN
            SELECT RAISE(ABORT, 'UNIQUE constraint failed: origins.wg_ip');
        END;
        CREATE TRIGGER edge_nodes_wg_ip_unique_insert
        BEFORE INSERT ON edge_nodes
        WHEN NEW.wg_ip IS NOT NULL
         AND EXISTS (SELECT 1 FROM origins WHERE wg_ip = NEW.wg_ip)
        BEGIN
            SELECT RAISE(ABORT, 'UNIQUE constraint failed: edge_nodes.wg_ip');
        END;
        CREATE TRIGGER edge_nodes_wg_ip_unique_update
        BEFORE UPDATE ON edge_nodes
        WHEN NEW.wg_ip IS NOT NULL
         AND EXISTS (SELECT 1 FROM origins WHERE wg_ip = NEW.wg_ip)
        BEGIN
            SELECT RAISE(ABORT, 'UNIQUE constraint failed: edge_nodes.wg_ip');
        END;
PRAGMA user_version = 1;
