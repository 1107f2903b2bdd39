# Install test (CMake script mode), run by the ctest `install`:
#
#   cmake -DMOOR_SOURCE_DIR=<src> -DMOOR_BINARY_DIR=<build> -DWORK_DIR=<scratch dir>
#         -DC_COMPILER=<cc> -P tests/install/check.cmake
#
#  1. wipes WORK_DIR and runs `cmake --install MOOR_BINARY_DIR --prefix WORK_DIR/prefix`;
#  2. builds app.c against the installed moor with pkg-config, once linked to libmoor.so and
#     once statically to libmoor.a (`pkg-config --static`), and runs both;
#  3. configures and builds this directory's CMakeLists.txt, an outside project using
#     find_package(moor) with moor::moor and moor::moor_static, and runs both programs;
#  4. fails with the command, its exit status and its output on the first thing that is wrong.
#
# A sanitizer build of moor installs an instrumented library, which a program can only use if
# it is compiled and linked with the same -fsanitize flags. Neither moor.pc nor the CMake
# package carries them, so they are taken from MOOR_BINARY_DIR/CMakeCache.txt (MOOR_ASAN,
# MOOR_UBSAN, MOOR_TSAN and any -fsanitize= in CMAKE_C_FLAGS) and given to every build below.
cmake_minimum_required(VERSION 3.25)

foreach(var MOOR_SOURCE_DIR MOOR_BINARY_DIR WORK_DIR C_COMPILER)
  if(NOT DEFINED ${var} OR "${${var}}" STREQUAL "")
    message(FATAL_ERROR "install test: -D${var}=... is required")
  endif()
endforeach()
foreach(var MOOR_SOURCE_DIR MOOR_BINARY_DIR WORK_DIR)
  cmake_path(ABSOLUTE_PATH ${var} NORMALIZE)
  string(REGEX REPLACE "(.)/+$" "\\1" ${var} "${${var}}")
endforeach()
# WORK_DIR is wiped: refuse anything that is not a scratch directory of its own.
if(WORK_DIR STREQUAL "/" OR WORK_DIR STREQUAL MOOR_SOURCE_DIR OR WORK_DIR STREQUAL MOOR_BINARY_DIR)
  message(FATAL_ERROR "install test: refusing to wipe WORK_DIR=${WORK_DIR}")
endif()
set(cache_file "${MOOR_BINARY_DIR}/CMakeCache.txt")
if(NOT EXISTS "${cache_file}")
  message(FATAL_ERROR "install test: ${MOOR_BINARY_DIR} is not a configured build of moor")
endif()

set(prefix "${WORK_DIR}/prefix")
set(expected_output "moor install ok: 42")
set(here "${CMAKE_CURRENT_LIST_DIR}")

# ---- helpers ---------------------------------------------------------------------------------

# run_step(<what> [OUTPUT <var>] [TIMEOUT <s>] COMMAND <argv...>)
# Runs a command; on failure stops the test with the command line, exit status and output.
function(run_step what)
  cmake_parse_arguments(PARSE_ARGV 1 arg "" "OUTPUT;TIMEOUT" "COMMAND")
  if(NOT arg_TIMEOUT)
    set(arg_TIMEOUT 240)
  endif()
  list(JOIN arg_COMMAND " " cmdline)
  message(STATUS "${what}: ${cmdline}")
  execute_process(COMMAND ${arg_COMMAND}
    WORKING_DIRECTORY "${WORK_DIR}"
    TIMEOUT ${arg_TIMEOUT}
    RESULT_VARIABLE rc
    OUTPUT_VARIABLE out
    ERROR_VARIABLE err)
  if(NOT rc STREQUAL "0")
    message(FATAL_ERROR "install test: ${what} failed (exit status: ${rc})\n"
      "command: ${cmdline}\n"
      "--- stdout ---\n${out}\n--- stderr ---\n${err}")
  endif()
  if(arg_OUTPUT)
    set(${arg_OUTPUT} "${out}" PARENT_SCOPE)
  endif()
endfunction()

# run_app(<what> <exe> [LIBPATH <dir>])
# Runs a test program (with LD_LIBRARY_PATH=<dir>, or with LD_LIBRARY_PATH unset) and checks
# that it printed exactly the expected line.
function(run_app what exe)
  cmake_parse_arguments(PARSE_ARGV 2 arg "" "LIBPATH" "")
  if(arg_LIBPATH)
    set(env "LD_LIBRARY_PATH=${arg_LIBPATH}")
  else()
    set(env "--unset=LD_LIBRARY_PATH")
  endif()
  run_step("${what}" OUTPUT out TIMEOUT 120 COMMAND "${CMAKE_COMMAND}" -E env ${env} "${exe}")
  string(STRIP "${out}" out)
  if(NOT out STREQUAL expected_output)
    message(FATAL_ERROR "install test: ${what} printed\n${out}\ninstead of\n${expected_output}")
  endif()
endfunction()

# check_moor_linkage(<what> <exe> SHARED|STATIC [LIBPATH <dir>])
# With ldd: a SHARED program must load libmoor.so from the install prefix; a STATIC one must
# not load libmoor.so at all.
find_program(LDD ldd)
function(check_moor_linkage what exe kind)
  cmake_parse_arguments(PARSE_ARGV 3 arg "" "LIBPATH" "")
  if(NOT LDD)
    return()
  endif()
  if(arg_LIBPATH)
    set(env "LD_LIBRARY_PATH=${arg_LIBPATH}")
  else()
    set(env "--unset=LD_LIBRARY_PATH")
  endif()
  run_step("ldd ${what}" OUTPUT out TIMEOUT 60 COMMAND "${CMAKE_COMMAND}" -E env ${env} "${LDD}" "${exe}")
  string(REGEX MATCH "libmoor\\.so[^ \t\n]* => [^ \t\n]+" moor_line "${out}")
  if(kind STREQUAL "STATIC")
    if(moor_line)
      message(FATAL_ERROR "install test: ${what} should be linked to libmoor.a but loads ${moor_line}\n${out}")
    endif()
    return()
  endif()
  string(REGEX REPLACE "^.* => " "" loaded "${moor_line}")
  if(NOT loaded OR NOT EXISTS "${loaded}")
    message(FATAL_ERROR "install test: ${what} does not load libmoor.so:\n${out}")
  endif()
  file(REAL_PATH "${loaded}" loaded)
  cmake_path(GET loaded PARENT_PATH loaded_dir)
  if(NOT loaded_dir STREQUAL libdir_real)
    message(FATAL_ERROR "install test: ${what} loads ${loaded}, not the libmoor.so installed in "
      "${libdir}\n${out}")
  endif()
endfunction()

# ---- the build being tested: generator, build type, sanitizers --------------------------------

file(STRINGS "${cache_file}" cache_lines
  REGEX "^(MOOR_ASAN|MOOR_UBSAN|MOOR_TSAN|CMAKE_GENERATOR|CMAKE_MAKE_PROGRAM|CMAKE_BUILD_TYPE|CMAKE_C_FLAGS)(:[A-Z]+)?=")
foreach(line IN LISTS cache_lines)
  if(line MATCHES "^([A-Z_]+)(:[A-Z]+)?=(.*)$")
    set(cache_${CMAKE_MATCH_1} "${CMAKE_MATCH_3}")
  endif()
endforeach()

set(sanitizers "")
if(cache_MOOR_ASAN)
  list(APPEND sanitizers address)
endif()
if(cache_MOOR_UBSAN)
  list(APPEND sanitizers undefined)
endif()
if(cache_MOOR_TSAN)
  list(APPEND sanitizers thread)
endif()
# A sanitizer asked for by hand (-DCMAKE_C_FLAGS=-fsanitize=...) instruments the library too.
separate_arguments(cache_c_flags UNIX_COMMAND "${cache_CMAKE_C_FLAGS}")
foreach(flag IN LISTS cache_c_flags)
  if(flag MATCHES "^-fsanitize=(.+)$")
    string(REPLACE "," ";" more "${CMAKE_MATCH_1}")
    list(APPEND sanitizers ${more})
  endif()
endforeach()
list(REMOVE_DUPLICATES sanitizers)
set(san_compile "")
set(san_link "")
if(sanitizers)
  list(JOIN sanitizers "," san_list)
  set(san_compile -fsanitize=${san_list} -fno-omit-frame-pointer -fno-sanitize-recover=all)
  set(san_link -fsanitize=${san_list})
  message(STATUS "moor was built with -fsanitize=${san_list}: test programs get the same flags")
endif()

set(build_type "${cache_CMAKE_BUILD_TYPE}")
if(build_type STREQUAL "")
  set(build_type RelWithDebInfo)
endif()

# ---- 1. install into a fresh prefix ----------------------------------------------------------

file(REMOVE_RECURSE "${WORK_DIR}")
file(MAKE_DIRECTORY "${WORK_DIR}")
run_step("cmake --install" COMMAND "${CMAKE_COMMAND}" --install "${MOOR_BINARY_DIR}" --prefix "${prefix}")

# Find what was installed; the libdir is lib/ or lib/<multiarch>/ depending on GNUInstallDirs.
file(GLOB_RECURSE pc_files LIST_DIRECTORIES false "${prefix}/moor.pc")
list(FILTER pc_files INCLUDE REGEX "/pkgconfig/moor\\.pc$")
list(LENGTH pc_files n)
if(NOT n EQUAL 1)
  file(GLOB_RECURSE installed RELATIVE "${prefix}" "${prefix}/*")
  list(JOIN installed "\n  " installed)
  message(FATAL_ERROR "install test: expected one pkgconfig/moor.pc under ${prefix}, found ${n}. "
    "Installed:\n  ${installed}")
endif()
cmake_path(GET pc_files PARENT_PATH pc_dir)
cmake_path(GET pc_dir PARENT_PATH libdir)
file(REAL_PATH "${libdir}" libdir_real)
message(STATUS "installed libdir: ${libdir}")

file(GLOB_RECURSE headers LIST_DIRECTORIES false "${prefix}/moor.h")
list(LENGTH headers n)
if(NOT n EQUAL 1)
  message(FATAL_ERROR "install test: expected one moor.h under ${prefix}, found: ${headers}")
endif()
cmake_path(GET headers PARENT_PATH includedir)
file(REAL_PATH "${includedir}" includedir_real)
foreach(h moor.h moor/future.h)
  file(SHA256 "${MOOR_SOURCE_DIR}/include/${h}" source_hash)
  if(NOT EXISTS "${includedir}/${h}")
    message(FATAL_ERROR "install test: ${h} was not installed under ${includedir}")
  endif()
  file(SHA256 "${includedir}/${h}" installed_hash)
  if(NOT source_hash STREQUAL installed_hash)
    message(FATAL_ERROR "install test: installed ${includedir}/${h} differs from ${MOOR_SOURCE_DIR}/include/${h}")
  endif()
endforeach()

set(cmake_dir "${libdir}/cmake/moor")
foreach(f "${libdir}/libmoor.a" "${libdir}/libmoor.so" "${cmake_dir}/moorConfig.cmake"
          "${cmake_dir}/moorConfigVersion.cmake" "${cmake_dir}/moorTargets.cmake")
  if(NOT EXISTS "${f}")
    message(FATAL_ERROR "install test: ${f} was not installed")
  endif()
endforeach()

# Installed metadata must not point back into the source or build tree.
file(GLOB_RECURSE meta_files LIST_DIRECTORIES false "${prefix}/*.cmake" "${prefix}/*.pc")
foreach(f IN LISTS meta_files)
  file(READ "${f}" text)
  string(REPLACE "${WORK_DIR}" "<prefix>" text "${text}")
  foreach(tree "${MOOR_BINARY_DIR}" "${MOOR_SOURCE_DIR}")
    string(FIND "${text}" "${tree}" pos)
    if(NOT pos EQUAL -1)
      message(FATAL_ERROR "install test: installed ${f} refers to ${tree}:\n${text}")
    endif()
  endforeach()
endforeach()

# The version, three ways: the CMake package, the header and (below) moor.pc.
file(STRINGS "${cmake_dir}/moorConfigVersion.cmake" version_line
  REGEX "^set\\(PACKAGE_VERSION \"[0-9.]+\"\\)")
string(REGEX REPLACE "^set\\(PACKAGE_VERSION \"([0-9.]+)\"\\)$" "\\1" version "${version_line}")
file(STRINGS "${headers}" header_version REGEX "^#define MOOR_VERSION_(MAJOR|MINOR|PATCH) ")
string(REGEX REPLACE "#define MOOR_VERSION_[A-Z]+ +([0-9]+)" "\\1" header_version "${header_version}")
list(JOIN header_version "." header_version)
if(version STREQUAL "" OR NOT version STREQUAL header_version)
  message(FATAL_ERROR "install test: moorConfigVersion.cmake says version '${version}', "
    "moor.h says '${header_version}'")
endif()

# ---- 2. pkg-config -----------------------------------------------------------------------------

if(DEFINED ENV{PKG_CONFIG} AND NOT "$ENV{PKG_CONFIG}" STREQUAL "")
  set(PKG_CONFIG "$ENV{PKG_CONFIG}")
else()
  find_program(PKG_CONFIG NAMES pkg-config pkgconf)
  if(NOT PKG_CONFIG)
    message(FATAL_ERROR "install test: pkg-config not found")
  endif()
endif()
set(ENV{PKG_CONFIG_PATH} "${pc_dir}")
unset(ENV{PKG_CONFIG_SYSROOT_DIR})

run_step("pkg-config --modversion" OUTPUT pc_version COMMAND "${PKG_CONFIG}" --print-errors --modversion moor)
string(STRIP "${pc_version}" pc_version)
if(NOT pc_version STREQUAL version)
  message(FATAL_ERROR "install test: moor.pc says version '${pc_version}', the CMake package '${version}'")
endif()

# pkg_flags(<var> <pkg-config args...>): the flags as a list.
function(pkg_flags var)
  list(JOIN ARGN " " args)
  run_step("pkg-config ${args}" OUTPUT out COMMAND "${PKG_CONFIG}" --print-errors ${ARGN} moor)
  string(STRIP "${out}" out)
  separate_arguments(out UNIX_COMMAND "${out}")
  set(${var} "${out}" PARENT_SCOPE)
endfunction()

# require_dir(<what> <flags> <-I|-L> <real dir>): one of the flags' directories is <real dir>.
function(require_dir what flags opt want)
  set(seen "")
  foreach(flag IN LISTS flags)
    if(flag MATCHES "^${opt}(.+)$")
      set(dir "${CMAKE_MATCH_1}")
      list(APPEND seen "${dir}")
      if(IS_DIRECTORY "${dir}")
        file(REAL_PATH "${dir}" dir)
        if(dir STREQUAL want)
          return()
        endif()
      endif()
    endif()
  endforeach()
  message(FATAL_ERROR "install test: moor.pc's ${what} (${flags}) name no ${opt} for the installed "
    "${want}, only: ${seen}\nInstalled with --prefix ${prefix}, moor.pc points elsewhere: its "
    "prefix is fixed when moor is configured, so the installed package is not relocatable.\n"
    "moor.pc:\n${pc_text}")
endfunction()
file(READ "${pc_files}" pc_text)

set(warn -Wall -Wextra -Werror)

# Shared: the program loads libmoor.so from the prefix's libdir.
pkg_flags(pc_cflags --cflags)
pkg_flags(pc_libs --libs)
require_dir("Cflags" "${pc_cflags}" "-I" "${includedir_real}")
# A frame larger than a fiber's guard must hit it (moor.h): users compile with stack-clash
# protection, through moor.pc as through the CMake package.
list(FIND pc_cflags "-fstack-clash-protection" i)
if(i EQUAL -1)
  message(FATAL_ERROR "install test: moor.pc's Cflags lack -fstack-clash-protection: ${pc_cflags}")
endif()
require_dir("Libs" "${pc_libs}" "-L" "${libdir_real}")
set(exe "${WORK_DIR}/app-pkgconfig")
run_step("compile and link app.c (pkg-config, shared)" COMMAND
  "${C_COMPILER}" ${san_compile} ${warn} "${here}/app.c" ${pc_cflags} -o "${exe}" ${san_link} ${pc_libs})
run_app("app-pkgconfig" "${exe}" LIBPATH "${libdir}")
check_moor_linkage("app-pkgconfig" "${exe}" SHARED LIBPATH "${libdir}")

# Static: `pkg-config --static` adds Libs.private; -lmoor becomes the archive itself so that the
# linker cannot pick libmoor.so.
pkg_flags(pc_static_cflags --static --cflags)
pkg_flags(pc_static_libs --static --libs)
list(FIND pc_static_libs "-lmoor" i)
if(i EQUAL -1)
  message(FATAL_ERROR "install test: `pkg-config --static --libs moor` has no -lmoor: ${pc_static_libs}")
endif()
list(TRANSFORM pc_static_libs REPLACE "^-lmoor$" "${libdir}/libmoor.a")
set(exe "${WORK_DIR}/app-pkgconfig-static")
run_step("compile and link app.c (pkg-config --static, libmoor.a)" COMMAND
  "${C_COMPILER}" ${san_compile} ${warn} "${here}/app.c" ${pc_static_cflags} -o "${exe}" ${san_link} ${pc_static_libs})
run_app("app-pkgconfig-static" "${exe}")
check_moor_linkage("app-pkgconfig-static" "${exe}" STATIC)

# ---- 3. find_package(moor) from an outside CMake project -------------------------------------

set(outside "${WORK_DIR}/cmake-build")
set(gen_args "")
if(cache_CMAKE_GENERATOR)
  list(APPEND gen_args -G "${cache_CMAKE_GENERATOR}")
  if(cache_CMAKE_MAKE_PROGRAM)
    list(APPEND gen_args "-DCMAKE_MAKE_PROGRAM=${cache_CMAKE_MAKE_PROGRAM}")
  endif()
endif()
list(JOIN san_compile " " c_flags)
list(JOIN san_link " " exe_linker_flags)
run_step("configure the outside project" COMMAND "${CMAKE_COMMAND}"
  -S "${here}" -B "${outside}" ${gen_args}
  "-DCMAKE_C_COMPILER=${C_COMPILER}"
  "-DCMAKE_BUILD_TYPE=${build_type}"
  "-DCMAKE_PREFIX_PATH=${prefix}"
  "-DCMAKE_C_FLAGS=${c_flags}"
  "-DCMAKE_EXE_LINKER_FLAGS=${exe_linker_flags}"
  -DCMAKE_FIND_USE_PACKAGE_REGISTRY=OFF
  -DCMAKE_FIND_USE_SYSTEM_PACKAGE_REGISTRY=OFF)

# find_package must have taken the package just installed, not some other moor.
file(STRINGS "${outside}/CMakeCache.txt" moor_dir REGEX "^moor_DIR:")
string(REGEX REPLACE "^moor_DIR:[A-Z]*=" "" moor_dir "${moor_dir}")
file(REAL_PATH "${cmake_dir}" cmake_dir_real)
if(IS_DIRECTORY "${moor_dir}")
  file(REAL_PATH "${moor_dir}" moor_dir)
endif()
if(NOT moor_dir STREQUAL cmake_dir_real)
  message(FATAL_ERROR "install test: find_package(moor) used '${moor_dir}', not ${cmake_dir}")
endif()

run_step("build the outside project" COMMAND "${CMAKE_COMMAND}" --build "${outside}" --config "${build_type}")

foreach(app app app_static)
  set(exe "${outside}/${app}")
  if(NOT EXISTS "${exe}")
    set(exe "${outside}/${build_type}/${app}") # multi-config generators
  endif()
  if(app STREQUAL "app")
    # Imported moor::moor gives the program a build RPATH to the prefix's libdir.
    run_app("find_package: app (moor::moor)" "${exe}")
    check_moor_linkage("find_package: app" "${exe}" SHARED)
  else()
    run_app("find_package: app_static (moor::moor_static)" "${exe}")
    check_moor_linkage("find_package: app_static" "${exe}" STATIC)
  endif()
endforeach()

message(STATUS "install test passed: pkg-config (shared, static) and find_package(moor) "
  "(moor::moor, moor::moor_static) against ${prefix}")
